"""KL-divergence distillation from stored teacher scores."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class DistillKLDivLoss(nn.Module):
    """KL(teacher ‖ student) over each query's candidate list (positive and negatives).

    Both score lists are turned into distributions with a softmax at ``temperature``; the loss is
    multiplied by ``temperature²`` so its gradient scale does not shrink as the temperature grows
    (Hinton et al.). The student sees the whole ranking the teacher produced, not just the top item.

    Args:
        temperature: softmax temperature shared by student and teacher.
        student_scale: multiplier on the student scores first (20 for cosine scores).

    Requirements:
        1. Training data with a teacher score for every candidate (``pos_scores`` + ``neg_scores``).

    Inputs:
        +-----------------+--------+------------------------------------------------+
        | argument        | shape  | meaning                                        |
        +=================+========+================================================+
        | student_scores  | [B, C] | student scores, candidates in any fixed order  |
        | teacher_scores  | [B, C] | teacher scores for the same candidates         |
        +-----------------+--------+------------------------------------------------+

    References:
        - Lin et al., "In-Batch Negatives for Knowledge Distillation with Tightly-Coupled Teachers
          for Dense Retrieval", RepL4NLP 2021.
        - Hinton et al., "Distilling the Knowledge in a Neural Network", 2015.
        - sentence-transformers ``DistillKLDivLoss``.
    """

    def __init__(self, temperature: float = 1.0, student_scale: float = 1.0):
        super().__init__()
        self.temperature = temperature
        self.student_scale = student_scale

    def forward(self, student_scores: torch.Tensor, teacher_scores: torch.Tensor) -> torch.Tensor:
        student = F.log_softmax(student_scores.float() * self.student_scale / self.temperature, dim=1)
        teacher = F.log_softmax(teacher_scores.float().to(student.device) / self.temperature, dim=1)
        kl = F.kl_div(student, teacher, log_target=True, reduction="batchmean")
        return kl * self.temperature ** 2
