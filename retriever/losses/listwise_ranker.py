"""Listwise cross-entropy for a cross-encoder ranker (softmax over the positive and its hard negatives)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class ListwiseRankerLoss(nn.Module):
    """Softmax cross-entropy over each query's group: the positive and ``G - 1`` hard negatives.

    ``-log softmax(s / τ)[0]`` where ``s`` are the cross-encoder's logits for (query, candidate) pairs of
    one group, the positive first. Only score differences inside a group are learnt, so the trained
    logits have no fixed zero point (thresholds on them are relative to the model).

    Args:
        temperature: τ, divides the logits before the softmax (1 in FlagEmbedding's reranker).

    Requirements:
        1. Groups of the same size ``G``: the positive in column 0, then ``G - 1`` negatives
           (mined by a retriever: BM25, a dense index or a mined JSONL).

    Inputs:
        +--------------+--------+-----------------------------------------------+
        | argument     | shape  | meaning                                       |
        +==============+========+===============================================+
        | logits       | [B, G] | cross-encoder logits, positive in column 0    |
        +--------------+--------+-----------------------------------------------+

    References:
        - FlagEmbedding reranker training (``train_group_size``): https://github.com/FlagOpen/FlagEmbedding
        - Zhang et al., "Adversarial Retriever-Ranker for Dense Text Retrieval", ICLR 2022 (the ranker's
          loss). https://arxiv.org/abs/2110.03611
        - Gao et al., "Rethink Training of BERT Rerankers in Multi-Stage Retrieval Pipeline" (LCE), ECIR 2021.
          https://arxiv.org/abs/2101.08751
    """

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        if logits.ndim != 2 or logits.shape[1] < 2:
            raise ValueError(f"expected logits of shape [B, G] with G >= 2, got {tuple(logits.shape)}")
        target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        return F.cross_entropy(logits.float() / self.temperature, target)
