"""Decoupled contrastive loss: InfoNCE with the positive removed from the denominator."""

from __future__ import annotations

import torch

from retriever.losses.contrastive import ContrastiveLoss


class DecoupledContrastiveLoss(ContrastiveLoss):
    def __init__(self, temperature: float = 0.05):
        """InfoNCE without the positive in the normaliser (DCL); selected with ``training.loss: decoupled``.

        Standard InfoNCE, ``-s_pos + log Σ_all exp(s)``, couples the positive and negative gradients
        through the softmax: once the positive dominates, the gradient vanishes even if negatives are
        still close, which makes small batches learn slowly. DCL drops the positive term from the
        log-sum-exp: ``-s_pos + log Σ_neg exp(s)``. The loss can go negative; only its gradient matters.
        A drop-in for :class:`ContrastiveLoss`: same inputs, same ``exclude`` mask.

        Args:
            temperature: Similarities are divided by it (0.05 = scale 20).

        Requirements:
            1. (query, positive) pairs with in-batch and/or hard negatives.
            2. At least one candidate per query besides its positive that is not excluded; a query whose
               every negative is excluded contributes 0 to the mean (no gradient), never a non-finite loss.

        Inputs:
            +------------------------------+----------------------------------------------+
            | argument                     | shape / meaning                              |
            +==============================+==============================================+
            | query_emb                    | [Q, d] float, with gradients                 |
            | doc_emb                      | [D, d] float, all candidates of the batch    |
            | targets                      | [Q] long, row of each query's positive       |
            | exclude (optional)           | [Q, D] bool, True drops that candidate       |
            +------------------------------+----------------------------------------------+

        Example:
            ::

                loss = DecoupledContrastiveLoss(0.05)(q, d, torch.arange(len(q)))

        References:
            - Yeh et al., "Decoupled Contrastive Learning", ECCV 2022. https://arxiv.org/abs/2110.06848
        """
        super().__init__(temperature)

    def from_similarities(self, similarities: torch.Tensor, targets: torch.Tensor,
                          exclude: torch.Tensor | None = None) -> torch.Tensor:
        scores = similarities.float() / self.temperature
        rows = torch.arange(len(targets), device=scores.device)
        positive = scores[rows, targets]
        drop = torch.zeros_like(scores, dtype=torch.bool)
        drop[rows, targets] = True
        if exclude is not None:
            drop |= exclude.to(scores.device)
        # A row whose every negative is excluded has nothing to contrast with (log Σ over nothing is -inf):
        # it contributes 0 to the mean, as it would under InfoNCE, where only the positive is left.
        has_negative = ~drop.all(dim=1)
        negatives = scores.masked_fill(drop, torch.finfo(scores.dtype).min)
        per_row = torch.logsumexp(negatives, dim=1) - positive
        return torch.where(has_negative, per_row, torch.zeros_like(per_row)).mean()
