"""Losses, one class per file (sentence-transformers style)."""

from retriever.losses.contrastive import ContrastiveLoss
from retriever.losses.decoupled import DecoupledContrastiveLoss

#: ``training.loss`` names -> the contrastive loss class the trainer builds (``cls(temperature)``).
CONTRASTIVE_LOSSES = {"infonce": ContrastiveLoss, "decoupled": DecoupledContrastiveLoss}

__all__ = ["CONTRASTIVE_LOSSES", "ContrastiveLoss", "DecoupledContrastiveLoss"]
