import numpy as np
import pytest
import torch

from retriever.data import TrainingExample
from retriever.losses import ContrastiveLoss
from retriever.negatives import HardNegatives, InBatchNegatives, get_strategy, register_strategy
from retriever.negatives.base import NegativeStrategy
from retriever.train_data import BatchCollator


def embeddings(n, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)


def test_loss_is_cross_entropy_over_scaled_similarities():
    q, d = embeddings(4), embeddings(10, seed=1)
    targets = torch.tensor([0, 1, 2, 3])
    expected = torch.nn.functional.cross_entropy(q @ d.T / 0.05, targets)
    assert torch.allclose(ContrastiveLoss(0.05)(q, d, targets), expected)
    assert not torch.allclose(ContrastiveLoss(0.1)(q, d, targets), expected)


def test_excluded_candidates_leave_the_softmax_but_the_target_stays():
    q, d = embeddings(2), embeddings(5, seed=1)
    targets = torch.tensor([0, 1])
    exclude = torch.zeros(2, 5, dtype=torch.bool)
    exclude[0, 3] = True
    exclude[0, 0] = True  # the target itself: must be ignored
    loss = ContrastiveLoss(0.05)(q, d, targets, exclude)
    keep = [0, 1, 2, 4]
    row0 = torch.nn.functional.cross_entropy((q[:1] @ d[keep].T) / 0.05, torch.tensor([0]))
    row1 = torch.nn.functional.cross_entropy((q[1:] @ d.T) / 0.05, torch.tensor([1]))
    assert torch.allclose(loss, (row0 + row1) / 2, atol=1e-6)


def test_collator_masks_other_queries_copies_of_a_positive():
    examples = [TrainingExample("q0", ["shared passage"], ["n0"]), TrainingExample("q1", ["p1"], ["n1"]),
                TrainingExample("q2", ["shared passage"], ["n2"])]
    batch = BatchCollator(HardNegatives({"per_query": 1}), seed=0)(examples, [0, 1, 2], epoch=0)
    assert batch.documents == ["shared passage", "p1", "shared passage", "n0", "n1", "n2"]
    assert batch.targets.tolist() == [0, 1, 2]
    assert batch.exclude[0].tolist() == [True, False, True, False, False, False]
    assert batch.exclude[1].tolist() == [False, True, False, False, False, False]
    assert batch.exclude[2].tolist() == [True, False, True, False, False, False]


def test_collator_shards_the_global_batch_by_rank():
    examples = [TrainingExample(f"q{i}", [f"p{i}"], [f"n{i}"]) for i in range(4)]
    full = BatchCollator(HardNegatives(), seed=0)(examples, range(4), 0)
    r1 = BatchCollator(HardNegatives(), seed=0, rank=1, world_size=2)(examples, range(4), 0)
    assert r1.queries == ["q2", "q3"] and r1.documents == ["p2", "p3", "n2", "n3"]
    assert r1.global_documents == ["p0", "p1", "n0", "n1", "p2", "p3", "n2", "n3"]
    assert r1.targets.tolist() == [4, 5] and r1.exclude.shape == (2, 8)
    assert sorted(full.documents) == sorted(r1.global_documents)


def test_hard_negatives_sample_per_query_deterministically():
    strategy = HardNegatives({"per_query": 2})
    ex = TrainingExample("q", ["p"], ["a", "b", "c", "d"])
    picks = strategy.negatives_for(ex, np.random.default_rng([1, 0, 5]))
    assert len(picks) == 2 and len(set(picks)) == 2 and set(picks) <= set(ex.negatives)
    assert picks == strategy.negatives_for(ex, np.random.default_rng([1, 0, 5]))
    assert sorted(strategy.negatives_for(TrainingExample("q", ["p"], ["x"]), np.random.default_rng(0))) == ["x", "x"]
    with pytest.raises(ValueError, match="has no hard negatives"):
        strategy.negatives_for(TrainingExample("q", ["p"]), np.random.default_rng(0))
    assert InBatchNegatives().negatives_for(ex, np.random.default_rng(0)) == []


def test_registry():
    assert get_strategy("inbatch") is InBatchNegatives and get_strategy("hard") is HardNegatives
    with pytest.raises(KeyError, match="known: .*hard.*inbatch"):
        get_strategy("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_strategy("hard")(type("Other", (NegativeStrategy,), {}))
    with pytest.raises(TypeError):
        register_strategy("not-a-strategy")(int)
