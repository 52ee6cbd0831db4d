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


def candidate_ranks(scores: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """1-based rank of every candidate in its row, by descending score (invalid candidates last)."""
    with torch.no_grad():
        ordered = scores.detach().float()
        if valid is not None:
            ordered = ordered.masked_fill(~valid, float("-inf"))
        order = ordered.argsort(dim=1, descending=True, stable=True)
        ranks = torch.empty_like(order)
        ranks.scatter_(1, order, torch.arange(1, scores.shape[1] + 1, device=scores.device).expand_as(order))
        return ranks


def delta_mrr_weights(positive_scores: torch.Tensor, negative_scores: torch.Tensor,
                      cutoff: int | None = 10) -> torch.Tensor:
    """|ΔMRR| of swapping the positive with each negative, from the current scores.

    The positive's rank is one plus the number of negatives scored above it; each negative's rank is
    its position in the list sorted by score (the positive included). Swapping the two moves the
    reciprocal rank from ``1/r_pos`` to ``1/r_neg``. Returns ``[B, K]`` (no gradient).
    """
    scores = torch.cat([positive_scores.unsqueeze(1), negative_scores], dim=1)
    gain = reciprocal_rank_gain(candidate_ranks(scores), cutoff)
    return (gain[:, :1] - gain[:, 1:]).abs()


class LambdaRankLoss(nn.Module):
    """ADORE's LambdaLoss-style objective over each query's retrieved candidates and its positives.

    Each query's candidate list is what the current query encoder retrieved (positives included where
    retrieved) plus the positives it missed. Every (relevant, non-relevant) pair of the list contributes
    a pairwise logistic loss ``softplus(-(s_rel - s_neg) * scale)`` weighted by ``|ΔMRR|``: how much the
    reciprocal rank would change if the two swapped places in the current ranking of *all* candidates.
    A query's loss is the weighted sum divided by its number of pairs (as DRhard's ``adore/train.py``),
    and the batch loss is the mean over queries, so a query with many positives or candidates does not
    outweigh the others. Pairs that cannot change MRR@cutoff (both beyond the cutoff) get no weight, so
    the query encoder spends its capacity on the top of the ranking. ``mode="listwise"`` replaces it with
    softmax cross-entropy of each positive against the query's non-relevant candidates (the listwise
    alternative the paper also reports), averaged over positives.

    Args:
        scale: multiplier on the scores before the logistic / softmax (20 for cosine scores, 1 for
            raw dot products as in the paper's BERT-base models).
        cutoff: MRR cutoff for the weights (10 = MRR@10, ``None`` = full MRR).
        mode: ``"lambda"`` (ΔMRR-weighted pairwise) or ``"listwise"``.

    Requirements:
        1. Candidates retrieved by the current query encoder from a fixed document index (ADORE), with
           every positive of the query in the list (appended when not retrieved).

    Inputs:
        +-------------------+--------+----------------------------------------------------+
        | argument          | shape  | meaning                                            |
        +===================+========+====================================================+
        | scores            | [B, N] | score of each candidate (gradients flow)           |
        | relevant          | [B, N] | bool, True for the query's positives               |
        | valid (optional)  | [B, N] | bool, False for padding (rows of unequal length)   |
        +-------------------+--------+----------------------------------------------------+

        The older form ``loss(positive_scores [B], negative_scores [B, K])`` (one positive first) is
        still accepted.

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

    def forward(self, scores: torch.Tensor, relevant: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        if scores.dim() == 1:  # (positive_scores [B], negative_scores [B, K])
            scores = torch.cat([scores.unsqueeze(1), relevant], dim=1)
            relevant = torch.zeros_like(scores, dtype=torch.bool)
            relevant[:, 0] = True
        relevant = relevant.bool()
        valid = torch.ones_like(relevant) if valid is None else valid.bool()
        relevant = relevant & valid
        negative = ~relevant & valid
        if not relevant.any(dim=1).all() or not negative.any(dim=1).all():
            raise ValueError("every query needs at least one relevant and one non-relevant candidate")
        scores = scores.float() * self.scale
        # pair (i, j): candidate i relevant, candidate j not
        pairs = (relevant.unsqueeze(2) & negative.unsqueeze(1)).float()                    # [B, N, N]
        if self.mode == "listwise":
            neg_logits = scores.masked_fill(~negative, float("-inf"))
            # log-softmax of each relevant i over {i} ∪ negatives
            denom = torch.logaddexp(scores, torch.logsumexp(neg_logits, dim=1, keepdim=True))
            per_positive = (denom - scores) * relevant
            return (per_positive.sum(1) / relevant.sum(1)).mean()
        with torch.no_grad():
            gain = reciprocal_rank_gain(candidate_ranks(scores, valid), self.cutoff)
            weights = (gain.unsqueeze(2) - gain.unsqueeze(1)).abs() * pairs
        margins = scores.unsqueeze(2) - scores.unsqueeze(1)                                 # s_i - s_j
        per_query = (F.softplus(-margins) * weights).sum(dim=(1, 2)) / pairs.sum(dim=(1, 2))
        return per_query.mean()
