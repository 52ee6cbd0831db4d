"""STAR's pairwise loss: each (query, positive) against every other document of the batch, one pair at a time."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class PairwiseLoss(nn.Module):
    """Pairwise logistic (RankNet) loss over (s⁺, s⁻) pairs, as DRhard's STAR trains.

    For every query and every candidate of the (global) batch that is not its positive, the loss is
    ``-log softmax([s⁺, s⁻])[0] = softplus((s⁻ - s⁺) / temperature)``, averaged over all such pairs.
    The other queries' documents (their positives and their random corpus negatives) are STAR's random
    negatives and the static hard negatives of the batch its hard ones; unlike InfoNCE each pair is
    scored on its own, so one easy candidate cannot dilute a hard one. Candidates flagged in ``exclude``
    (copies of the query's own positive, guide-flagged false negatives) form no pair.

    Args:
        temperature: Score differences are divided by it (DRhard's raw dot products: 1; 0.05 fits
            cosine scores, like ``ContrastiveLoss``).

    Requirements:
        1. (query, positive) pairs with in-batch documents, optionally static hard negatives (STAR).

    Inputs:
        +------------------------------+----------------------------------------------+
        | argument                     | shape / meaning                              |
        +==============================+==============================================+
        | query_emb                    | [Q, d] float, with gradients                 |
        | doc_emb                      | [D, d] float, all candidates of the batch    |
        | targets                      | [Q] long, row of each query's positive       |
        | exclude (optional)           | [Q, D] bool, True drops that pair            |
        +------------------------------+----------------------------------------------+

    Example:
        ::

            loss_fn = PairwiseLoss(temperature=0.05)
            loss = loss_fn(q, d, torch.arange(len(queries)))

    References:
        - Zhan et al., "Optimizing Dense Retrieval Model Training with Hard Negatives", SIGIR 2021
          (STAR). https://arxiv.org/abs/2104.08051 ; code: github.com/jingtaozhan/DRhard (``model.py``,
          ``inbatch_train``).
        - Burges et al., "Learning to Rank using Gradient Descent" (RankNet), ICML 2005.
    """

    def __init__(self, temperature: float = 0.05):
        super().__init__()
        self.temperature = temperature

    def forward(self, query_emb: torch.Tensor, doc_emb: torch.Tensor, targets: torch.Tensor,
                exclude: torch.Tensor | None = None) -> torch.Tensor:
        scores = query_emb.float() @ doc_emb.float().T / self.temperature          # [Q, D]
        rows = torch.arange(len(targets), device=scores.device)
        positive = scores[rows, targets].unsqueeze(1)                              # [Q, 1]
        pairs = torch.ones_like(scores, dtype=torch.bool)
        pairs[rows, targets] = False
        if exclude is not None:
            pairs &= ~exclude.to(scores.device)
        if not pairs.any():
            raise ValueError("no (positive, negative) pair left in the batch: every candidate is excluded")
        return F.softplus(scores - positive)[pairs].mean()
