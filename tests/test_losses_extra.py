"""Defining properties of the extra losses (GIST, ADORE lambda-rank, AR2, DCL, MarginMSE, KL)."""

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from retriever.losses.ar2 import AR2RankerLoss, AR2RetrieverLoss
from retriever.losses.decoupled import DecoupledContrastiveLoss
from retriever.losses.distill_kl import DistillKLDivLoss
from retriever.losses.gist import GISTLoss, guide_mask
from retriever.losses.lambda_rank import LambdaRankLoss, delta_mrr_weights
from retriever.losses.margin_mse import MarginMSELoss


def test_gist_masks_exactly_candidates_guide_scores_above_positive():
    torch.manual_seed(0)
    b, n = 5, 8
    guide_qd, guide_qq, guide_dd = torch.randn(b, n), torch.randn(b, b), torch.randn(b, n)
    loss = GISTLoss()
    labels = torch.arange(b)
    qd, qq, dd = loss.masks(guide_qd, labels, guide_qq, guide_dd)
    for i in range(b):
        pos = guide_qd[i, i]
        for j in range(n):
            assert qd[i, j] == (j != i and bool(guide_qd[i, j] > pos))
            assert dd[i, j] == (j == i or bool(guide_dd[i, j] > pos))
        for j in range(b):
            assert qq[i, j] == (j == i or bool(guide_qq[i, j] > pos))


def test_gist_loss_ignores_masked_candidates_and_margins():
    torch.manual_seed(1)
    student = torch.randn(4, 6, requires_grad=True)
    guide = torch.randn(4, 6)
    loss = GISTLoss(scale=1.0)(student, guide)
    keep = ~guide_mask(guide, guide.diagonal())
    keep[range(4), range(4)] = True
    manual = torch.stack([-(student[i, i] - torch.logsumexp(student[i][keep[i]], 0)) for i in range(4)]).mean()
    assert torch.allclose(loss, manual)
    # A positive margin masks more: anything within `margin` of the positive.
    g = torch.tensor([[0.5, 0.46, 0.2]])
    assert guide_mask(g, torch.tensor([0.5]), margin=0.1).tolist() == [[True, True, False]]
    assert guide_mask(g, torch.tensor([0.5]), margin=0.1, strategy="relative").tolist() == [[True, True, False]]
    assert guide_mask(g, torch.tensor([0.5]), margin=0.0).tolist() == [[False, False, False]]


def test_delta_mrr_weights_follow_swap_in_reciprocal_rank():
    pos = torch.tensor([0.5])
    neg = torch.tensor([[0.9, 0.4, 0.1]])  # ranking: neg0 (1), pos (2), neg1 (3), neg2 (4)
    w = delta_mrr_weights(pos, neg, cutoff=None)
    assert torch.allclose(w, torch.tensor([[1 - 1 / 2, 1 / 2 - 1 / 3, 1 / 2 - 1 / 4]]))
    w10 = delta_mrr_weights(pos, neg, cutoff=3)
    assert torch.allclose(w10, torch.tensor([[0.5, 1 / 2 - 1 / 3, 0.5]]))


def test_lambda_rank_pushes_positive_up_and_listwise_is_ce():
    pos = torch.tensor([0.2, 0.1], requires_grad=True)
    neg = torch.tensor([[0.3, 0.0], [0.5, 0.4]], requires_grad=True)
    loss = LambdaRankLoss(scale=5.0)(pos, neg)
    loss.backward()
    assert loss > 0 and (pos.grad < 0).all() and (neg.grad >= 0).all()
    listwise = LambdaRankLoss(scale=1.0, mode="listwise")(pos.detach(), neg.detach())
    expected = F.cross_entropy(torch.cat([pos.detach()[:, None], neg.detach()], 1), torch.zeros(2, dtype=torch.long))
    assert torch.allclose(listwise, expected)


def test_ar2_losses():
    ranker = torch.tensor([[3.0, 1.0, -1.0]])
    assert torch.allclose(AR2RankerLoss()(ranker), F.cross_entropy(ranker, torch.tensor([0])))
    retr = torch.zeros(1, 3, requires_grad=True)
    kl_only = AR2RetrieverLoss(adv_lambda=0.0, scale=1.0)(retr, ranker)
    p = F.softmax(ranker, 1)
    assert torch.allclose(kl_only, (p * (p.log() - math.log(1 / 3))).sum())
    # The adversarial term raises the retriever's probability of the negative the ranker confuses most.
    retr = torch.zeros(1, 3, requires_grad=True)
    AR2RetrieverLoss(adv_lambda=1.0, scale=1.0)(retr, torch.tensor([[1.0, 0.9, -5.0]])).backward()
    assert retr.grad[0, 1] < retr.grad[0, 2]


def test_decoupled_loss_removes_positive_from_denominator():
    q = torch.eye(3)[:2]  # scores = q @ d.T picks columns of d
    d = torch.tensor([[0.9, 0.3, 0.0], [0.1, 0.8, 0.0], [0.2, -0.1, 0.0]])
    scores = q @ d.T  # [[0.9, 0.1, 0.2], [0.3, 0.8, -0.1]]
    targets = torch.tensor([0, 1])
    loss = DecoupledContrastiveLoss(temperature=1.0)(q, d, targets)
    expected = torch.stack([torch.logsumexp(torch.tensor([0.1, 0.2]), 0) - 0.9,
                            torch.logsumexp(torch.tensor([0.3, -0.1]), 0) - 0.8]).mean()
    assert torch.allclose(loss, expected)
    assert torch.allclose(scores[0], torch.tensor([0.9, 0.1, 0.2]))
    # Moving the positive changes the loss linearly (no softmax coupling).
    bumped = d.clone()
    bumped[0, 0] += 1.0
    assert torch.allclose(DecoupledContrastiveLoss(temperature=1.0)(q, bumped, targets), loss - 0.5)
    # Excluded candidates leave the denominator too.
    exclude = torch.tensor([[False, False, True], [False, False, False]])
    masked = DecoupledContrastiveLoss(temperature=1.0)(q, d, targets, exclude)
    row0 = torch.tensor(0.1 - 0.9)  # only candidate 1 is left in query 0's denominator
    row1 = torch.logsumexp(torch.tensor([0.3, -0.1]), 0) - 0.8
    assert torch.allclose(masked, (row0 + row1) / 2)


def test_training_loss_key_selects_decoupled_loss(tiny_model_dir, tmp_path):
    from retriever.config import TrainConfig
    from retriever.trainer import Trainer

    cfg = TrainConfig.model_validate({
        "model": {"name": str(tiny_model_dir)},
        "data": {"jsonl": str(tmp_path / "train.jsonl")},
        "training": {"batch_size": 2, "max_steps": 1, "loss": "decoupled"},
    })
    (tmp_path / "train.jsonl").write_text("".join(
        f'{{"query": "question {i}", "pos": ["answer {i}"], "neg": []}}\n' for i in range(4)))
    trainer = Trainer(cfg, tmp_path / "run")
    assert isinstance(trainer.loss_fn, DecoupledContrastiveLoss)
    assert np.isfinite(trainer.train_step(0))


def test_margin_mse_zero_when_margins_match():
    pos, neg = torch.tensor([2.0]), torch.tensor([[1.0, 0.0]])
    assert MarginMSELoss()(pos, neg, pos + 5, neg + 5) == 0
    assert torch.isclose(MarginMSELoss()(pos, neg, torch.tensor([2.0]), torch.tensor([[2.0, 2.0]])),
                         torch.tensor((1.0 + 4.0) / 2))


def test_distill_kl_zero_iff_same_distribution():
    s = torch.tensor([[1.0, 0.0, -1.0]])
    assert torch.isclose(DistillKLDivLoss()(s, s + 3.0), torch.tensor(0.0), atol=1e-6)
    assert DistillKLDivLoss()(s, torch.tensor([[-1.0, 0.0, 1.0]])) > 0.1
    with pytest.raises(ValueError):
        GISTLoss(margin_strategy="bogus")


def test_decoupled_loss_is_finite_when_every_negative_of_a_row_is_masked():
    """A row with no negative left (GISTEmbed can mask them all) contributes 0; the others keep their loss."""
    torch.manual_seed(0)
    q = torch.randn(3, 8, requires_grad=True)
    d = torch.randn(3, 8)
    targets = torch.arange(3)
    exclude = torch.zeros(3, 3, dtype=torch.bool)
    exclude[0, 1:] = True  # row 0: only its positive remains
    loss_fn = DecoupledContrastiveLoss(temperature=1.0)
    loss = loss_fn(q, d, targets, exclude)
    assert torch.isfinite(loss)
    scores = q @ d.T
    per_row = [torch.logsumexp(scores[i][[j for j in range(3) if j != i]], 0) - scores[i, i] for i in (1, 2)]
    assert torch.allclose(loss, (0 + per_row[0] + per_row[1]) / 3)
    loss.backward()
    assert torch.isfinite(q.grad).all() and torch.all(q.grad[0] == 0)
