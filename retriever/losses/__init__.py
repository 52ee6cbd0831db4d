"""Losses, one class per file (sentence-transformers style)."""

from retriever.losses.contrastive import ContrastiveLoss

__all__ = ["ContrastiveLoss"]
