"""Margin-MSE distillation from stored teacher scores."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class MarginMSELoss(nn.Module):
    """Match the student's positive–negative margin to a teacher's (usually a cross-encoder).

    ``MSE(s(q, d⁺) - s(q, d⁻),  t(q, d⁺) - t(q, d⁻))`` for every negative of the query. Only the
    margins are matched, so the student's and teacher's score scales need not agree in absolute terms.

    Args:
        scale: multiplier on the student scores before taking margins (1 for dot products; for
            cosine scores pick the scale that brings them into the teacher's range).

    Requirements:
        1. Training data with teacher scores for the positive and each negative
           (``pos_scores`` / ``neg_scores`` in FlagEmbedding JSONL).

    Inputs:
        +--------------------------------------+--------+------------------------------------+
        | argument                             | shape  | meaning                            |
        +======================================+========+====================================+
        | positive_scores, teacher_positive    | [B]    | student / teacher positive scores  |
        | negative_scores, teacher_negative    | [B, K] | student / teacher negative scores  |
        +--------------------------------------+--------+------------------------------------+

    References:
        - Hofstätter et al., "Improving Efficient Neural Ranking Models with Cross-Architecture
          Knowledge Distillation", 2020. https://arxiv.org/abs/2010.02666
        - sentence-transformers ``MarginMSELoss``.
    """

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = scale

    def forward(self, positive_scores, negative_scores, teacher_positive, teacher_negative) -> torch.Tensor:
        student = (positive_scores.unsqueeze(1) - negative_scores).float() * self.scale
        teacher = (teacher_positive.unsqueeze(1) - teacher_negative).float().to(student.device)
        return F.mse_loss(student, teacher)
