"""GISTEmbed loss: in-batch InfoNCE whose false negatives are removed by a frozen guide model."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

MarginStrategy = Literal["absolute", "relative"]


def guide_mask(guide_scores: torch.Tensor, guide_positive: torch.Tensor, margin: float = 0.0,
               strategy: MarginStrategy = "absolute") -> torch.Tensor:
    """True where the guide scores a candidate above its row's positive (minus the margin).

    ``guide_scores`` is ``[B, N]``, ``guide_positive`` is ``[B]``. With ``margin=0`` both strategies
    mask exactly the candidates the guide ranks strictly above the positive.
    """
    pos = guide_positive.unsqueeze(1)
    if strategy == "absolute":
        threshold = pos - margin
    elif strategy == "relative":
        threshold = pos - pos.abs() * margin  # sentence-transformers' rule (equals pos * (1 - margin) for pos >= 0)
    else:
        raise ValueError(f"unknown margin strategy {strategy!r}; choose absolute or relative")
    return guide_scores > threshold


class GISTLoss(nn.Module):
    """Guided in-sample selection of training negatives (GISTEmbed).

    A frozen guide model scores every in-batch candidate of each query: the other queries' documents
    (query–document), the other queries (query–query) and the other documents seen from the positive
    (document–document). Every candidate the guide scores above the guide's own score for the true
    positive is treated as a probable false negative and removed from the softmax; then the student
    is trained with InfoNCE over what remains.

    Args:
        scale: inverse temperature applied to the student's cosine scores (20 = temperature 0.05).
        margin: slack on the guide threshold; 0 masks candidates strictly above the positive.
        margin_strategy: ``"absolute"`` masks ``guide > guide_pos - margin``; ``"relative"`` masks
            ``guide > guide_pos - |guide_pos| * margin``.

    Requirements:
        1. (query, positive) pairs, optionally with hard negatives appended as extra candidate columns.
        2. Guide scores for the same candidates (computed without gradient; may be cached).

    Inputs:
        +--------------------------------+-----------+-----------------------------------------+
        | argument                       | shape     | meaning                                 |
        +================================+===========+=========================================+
        | student_qd, guide_qd           | [B, N]    | query i vs document j; positive at      |
        |                                |           | column ``labels[i]`` (default i)        |
        | student_qq, guide_qq (opt.)    | [B, B]    | query i vs query j; the diagonal is     |
        |                                |           | always dropped                          |
        | student_dd, guide_dd (opt.)    | [B, P]    | positive document of i vs positive j    |
        |                                |           | (sentence-transformers: the batch's     |
        |                                |           | positives); column ``self_columns[i]``  |
        |                                |           | (itself) dropped                        |
        +--------------------------------+-----------+-----------------------------------------+

    The trainer uses :meth:`masks` for ``negatives.strategy: gist`` (query–document masks through
    ``exclude_mask``, the query–query and document–document blocks through ``extra_candidates``), so
    ``training.loss`` (InfoNCE or decoupled) applies to all three blocks; ``forward`` is the standalone
    InfoNCE form.

    References:
        - Solatorio, "GISTEmbed: Guided In-sample Selection of Training Negatives for Text
          Embedding Fine-tuning", 2024. https://arxiv.org/abs/2402.16829
        - sentence-transformers ``GISTEmbedLoss`` (same masking rule and margin strategies).
    """

    def __init__(self, scale: float = 20.0, margin: float = 0.0, margin_strategy: MarginStrategy = "absolute"):
        super().__init__()
        if margin_strategy not in ("absolute", "relative"):
            raise ValueError(f"unknown margin strategy {margin_strategy!r}; choose absolute or relative")
        self.scale = scale
        self.margin = margin
        self.margin_strategy = margin_strategy
        self.last_masked_fraction = 0.0

    def masks(self, guide_qd, labels, guide_qq=None, guide_dd=None, self_columns=None) -> list[torch.Tensor]:
        """The boolean masks (True = removed) for each candidate block, in the order qd, qq, dd.

        ``self_columns[i]``: the column of row i's own query in ``guide_qq`` and of its own positive in
        ``guide_dd`` (default: ``i`` in qq, ``labels[i]`` in dd; under torchrun the rank's offset)."""
        rows = torch.arange(guide_qd.shape[0], device=guide_qd.device)
        guide_pos = guide_qd[rows, labels]
        qq_self = rows if self_columns is None else self_columns
        dd_self = labels if self_columns is None else self_columns
        out = []
        qd = guide_mask(guide_qd, guide_pos, self.margin, self.margin_strategy)
        qd[rows, labels] = False  # the positive itself is the target, never masked
        out.append(qd)
        if guide_qq is not None:
            qq = guide_mask(guide_qq, guide_pos, self.margin, self.margin_strategy)
            qq[rows, qq_self] = True  # the query compared with itself
            out.append(qq)
        if guide_dd is not None:
            dd = guide_mask(guide_dd, guide_pos, self.margin, self.margin_strategy)
            dd[rows, dd_self] = True  # the positive compared with itself
            out.append(dd)
        return out

    def forward(self, student_qd, guide_qd, labels=None, student_qq=None, guide_qq=None,
                student_dd=None, guide_dd=None) -> torch.Tensor:
        if (student_qq is None) != (guide_qq is None) or (student_dd is None) != (guide_dd is None):
            raise ValueError("pass student and guide scores for the same candidate blocks")
        if labels is None:
            labels = torch.arange(student_qd.shape[0], device=student_qd.device)
        masks = self.masks(guide_qd, labels, guide_qq, guide_dd)
        blocks = [b for b in (student_qd, student_qq, student_dd) if b is not None]
        logits = torch.cat([b.float() * self.scale for b in blocks], dim=1)
        mask = torch.cat(masks, dim=1)
        self.last_masked_fraction = float(mask.float().mean())
        logits = logits.masked_fill(mask, float("-inf"))
        return F.cross_entropy(logits, labels)
