from __future__ import annotations

import torch
from torch import nn


class ContrastiveLoss(nn.Module):
    def __init__(self, temperature: float = 0.05):
        """InfoNCE over the batch's documents: each query's positive against every positive and hard
        negative of the (global) batch, including its own hard negatives. The same loss as
        sentence-transformers' MultipleNegativesRankingLoss (scale = 1 / temperature) and Tevatron's
        contrastive loss, with one addition: an ``exclude`` mask drops candidates from a query's softmax.
        The collator masks copies of a query's own positives (another query's positive with the same text
        is not a negative), and a negative strategy may mask more (GISTEmbed's guide-flagged false
        negatives).

        Args:
            temperature: Similarities are divided by it; 0.05 equals MNRL's default scale of 20.

        Requirements:
            1. (query, positive) pairs, optionally with hard negatives per query.
            2. Large batches: every other document in the batch is a negative.

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

                loss_fn = ContrastiveLoss(temperature=0.05)
                q = model.embed(model.tokenize(queries, "query"), "query")
                d = model.embed(model.tokenize(positives + negatives, "document"), "document")
                loss = loss_fn(q, d, torch.arange(len(queries)))

        References:
            - van den Oord et al., Representation Learning with Contrastive Predictive Coding (InfoNCE), 2018.
            - Karpukhin et al., Dense Passage Retrieval for Open-Domain Question Answering, EMNLP 2020.
        """
        super().__init__()
        self.temperature = temperature

    def forward(self, query_emb: torch.Tensor, doc_emb: torch.Tensor, targets: torch.Tensor,
                exclude: torch.Tensor | None = None) -> torch.Tensor:
        return self.from_similarities(query_emb.float() @ doc_emb.float().T, targets, exclude)

    def from_similarities(self, similarities: torch.Tensor, targets: torch.Tensor,
                          exclude: torch.Tensor | None = None) -> torch.Tensor:
        """The loss from a ``[Q, C]`` similarity matrix (before the temperature) whose columns are the
        candidates; a strategy that adds candidate columns of its own (GISTEmbed's query–query and
        document–document blocks) calls this with the concatenated matrix."""
        scores = similarities.float() / self.temperature
        if exclude is not None:
            keep_target = torch.zeros_like(exclude)
            keep_target[torch.arange(len(targets), device=exclude.device), targets] = True
            scores = scores.masked_fill(exclude & ~keep_target, torch.finfo(scores.dtype).min)
        return nn.functional.cross_entropy(scores, targets)
