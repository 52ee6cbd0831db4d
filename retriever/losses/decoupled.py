"""Decoupled contrastive loss: InfoNCE with the positive removed from the denominator."""

from __future__ import annotations

import torch
from torch import nn


class DecoupledContrastiveLoss(nn.Module):
    """InfoNCE without the positive in the normaliser (DCL).

    Standard InfoNCE, ``-s_pos + log Σ_all exp(s)``, couples the positive and negative gradients
    through the softmax: once the positive dominates, the gradient vanishes even if negatives are
    still close, which makes small batches learn slowly. DCL drops the positive term from the
    log-sum-exp: ``-s_pos + log Σ_{neg} exp(s)``. The loss can go negative; only its gradient matters.

    Args:
        scale: inverse temperature on the scores (20 = temperature 0.05 for cosine scores).

    Requirements:
        1. (query, positive) pairs with in-batch and/or hard negatives as extra columns.

    Inputs:
        +-----------+--------+-----------------------------------------------------------+
        | argument  | shape  | meaning                                                   |
        +===========+========+===========================================================+
        | scores    | [B, N] | query i vs candidate j                                    |
        | labels    | [B]    | column of each query's positive (default: the diagonal)   |
        +-----------+--------+-----------------------------------------------------------+

    References:
        - Yeh et al., "Decoupled Contrastive Learning", ECCV 2022. https://arxiv.org/abs/2110.06848
    """

    def __init__(self, scale: float = 20.0):
        super().__init__()
        self.scale = scale

    def forward(self, scores: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        rows = torch.arange(scores.shape[0], device=scores.device)
        if labels is None:
            labels = rows
        logits = scores.float() * self.scale
        positive = logits[rows, labels]
        negatives = logits.clone()
        negatives[rows, labels] = float("-inf")
        return (torch.logsumexp(negatives, dim=1) - positive).mean()
