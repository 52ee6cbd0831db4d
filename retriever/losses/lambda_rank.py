"""ADORE's ranking loss: pairwise logistic loss weighted by the change in MRR a swap would cause."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F


def reciprocal_rank_gain(ranks: torch.Tensor, cutoff: int | None) -> torch.Tensor:
    """1/rank, zero beyond ``cutoff`` (MRR@cutoff)."""
    gain = 1.0 / ranks.float()
    if cutoff is not None:
        gain = torch.where(ranks <= cutoff, gain, torch.zeros_like(gain))
    return gain


def delta_mrr_weights(positive_scores: torch.Tensor, negative_scores: torch.Tensor,
                      cutoff: int | None = 10) -> torch.Tensor:
    """|ΔMRR| of swapping the positive with each negative, from the current scores.

    The positive's rank is one plus the number of negatives scored above it; each negative's rank is
    its position in the list sorted by score (the positive included). Swapping the two moves the
    reciprocal rank from ``1/r_pos`` to ``1/r_neg``. Returns ``[B, K]`` (no gradient).
    """
    with torch.no_grad():
        scores = torch.cat([positive_scores.unsqueeze(1), negative_scores], dim=1)
        order = scores.argsort(dim=1, descending=True)
        ranks = torch.empty_like(order)
        ranks.scatter_(1, order, torch.arange(1, scores.shape[1] + 1, device=scores.device).expand_as(order))
        gain = reciprocal_rank_gain(ranks, cutoff)
        return (gain[:, :1] - gain[:, 1:]).abs()


class LambdaRankLoss(nn.Module):
    """ADORE's LambdaLoss-style objective over a positive and the negatives retrieved for it.

    For each query the positive is compared with each retrieved negative through a pairwise logistic
    loss ``softplus(-(s_pos - s_neg) * scale)``, weighted by ``|ΔMRR|``: how much the query's
    reciprocal rank would change if the two swapped places in the current ranking. Pairs that cannot
    change MRR@cutoff (both beyond the cutoff) get no weight, so the query encoder spends its capacity
    on the top of the ranking. ``mode="listwise"`` replaces it with softmax cross-entropy over
    ``[positive, negatives]`` (the listwise alternative the paper also reports).

    Args:
        scale: multiplier on the scores before the logistic / softmax (20 for cosine scores, 1 for
            raw dot products as in the paper's BERT-base models).
        cutoff: MRR cutoff for the weights (10 = MRR@10, ``None`` = full MRR).
        mode: ``"lambda"`` (ΔMRR-weighted pairwise) or ``"listwise"``.

    Requirements:
        1. Negatives retrieved by the current query encoder from a fixed document index (ADORE),
           positives excluded; their scores in retrieval order.

    Inputs:
        +-------------------+--------+--------------------------------------+
        | argument          | shape  | meaning                              |
        +===================+========+======================================+
        | positive_scores   | [B]    | score of each query's positive       |
        | negative_scores   | [B, K] | scores of its retrieved negatives    |
        +-------------------+--------+--------------------------------------+

    References:
        - Zhan et al., "Optimizing Dense Retrieval Model Training with Hard Negatives", SIGIR 2021
          (ADORE). https://arxiv.org/abs/2104.08051 ; code: github.com/jingtaozhan/DRhard
        - Wang et al., "The LambdaLoss Framework for Ranking Metric Optimization", CIKM 2018.
    """

    def __init__(self, scale: float = 20.0, cutoff: int | None = 10, mode: Literal["lambda", "listwise"] = "lambda"):
        super().__init__()
        if mode not in ("lambda", "listwise"):
            raise ValueError(f"unknown mode {mode!r}; choose lambda or listwise")
        self.scale = scale
        self.cutoff = cutoff
        self.mode = mode

    def forward(self, positive_scores: torch.Tensor, negative_scores: torch.Tensor) -> torch.Tensor:
        if self.mode == "listwise":
            logits = torch.cat([positive_scores.unsqueeze(1), negative_scores], dim=1).float() * self.scale
            return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device))
        weights = delta_mrr_weights(positive_scores, negative_scores, self.cutoff)
        margins = (positive_scores.unsqueeze(1) - negative_scores).float() * self.scale
        pairwise = F.softplus(-margins)
        return (pairwise * weights).sum(dim=1).mean()
