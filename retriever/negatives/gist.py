"""GISTEmbed: a frozen guide model flags in-batch false negatives, which leave the softmax.

The guide's embeddings of every training text are computed once (the guide is frozen, so they never
change) and looked up per batch: guided training costs one matrix product per step, not a forward pass
of a 110M-parameter guide. Texts the cache has not seen (none, with the shipped strategies) are
encoded on the fly and added.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from retriever.data import TrainingExample
from retriever.losses.gist import guide_mask
from retriever.negatives.base import NegativeStrategy, StrategyOptions, register_strategy


class GISTOptions(StrategyOptions):
    guide: str = Field("sentence-transformers/all-mpnet-base-v2", description="frozen guide model (name or path)")
    margin: float = Field(0.0, ge=0.0, description="slack on the guide threshold (0: strictly above the positive)")
    margin_strategy: Literal["absolute", "relative"] = "absolute"
    hard_per_query: int = Field(0, ge=0, description="hard negatives from the data per query (0: in-batch only)")
    cache: bool = Field(True, description="encode the training set with the guide once; False: every step")
    guide_batch_size: int = Field(64, gt=0)
    guide_bf16: bool | None = Field(None, description="bf16 autocast for the guide (None: where the device "
                                    "has native bf16; emulated bf16 is many times slower than fp32)")


@register_strategy("gist")
class GISTNegatives(NegativeStrategy):
    """In-batch (plus optional hard) negatives; candidates the guide scores above the positive are masked."""

    Options = GISTOptions

    def __init__(self, options=None):
        super().__init__(options)
        self.guide = None
        self._rows: dict[tuple[str, str], int] = {}
        self._emb = np.zeros((0, 0), dtype=np.float32)
        self.masked = 0
        self.candidates = 0

    # ------------------------------------------------------------------ setup
    def load_guide(self, device: torch.device | str = "cpu") -> None:
        from retriever.modeling import BiEncoder

        from index.encode import bf16_supported

        guide = BiEncoder.from_pretrained(self.options.guide).to(device)
        guide.eval()
        if self.options.guide_bf16 is None:
            self.options.guide_bf16 = bf16_supported(guide.device)
        for p in guide.parameters():
            p.requires_grad_(False)
        self.guide = guide

    def prepare(self, trainer: Any) -> None:
        self.load_guide(trainer.device)
        if self.options.cache:
            self.cache_examples(trainer.train_examples)

    def cache_examples(self, examples: list[TrainingExample]) -> None:
        """Guide embeddings of every query, positive and (used) hard negative, computed once."""
        queries = {ex.query for ex in examples}
        docs = {t for ex in examples for t in ex.positives}
        if self.options.hard_per_query:
            docs |= {t for ex in examples for t in ex.negatives}
        self._add("query", sorted(queries))
        self._add("document", sorted(docs))

    def _add(self, kind: str, texts: list[str]) -> None:
        texts = [t for t in texts if (kind, t) not in self._rows]
        if not texts:
            return
        emb = self.guide.encode(texts, kind=kind, batch_size=self.options.guide_batch_size, bf16=self.options.guide_bf16)
        start = len(self._rows)
        self._emb = emb if self._emb.size == 0 else np.concatenate([self._emb, emb])
        self._rows.update({(kind, t): start + i for i, t in enumerate(texts)})

    def guide_embeddings(self, texts: list[str], kind: str) -> torch.Tensor:
        if not self.options.cache:
            return torch.from_numpy(self.guide.encode(texts, kind=kind, batch_size=self.options.guide_batch_size,
                                                      bf16=self.options.guide_bf16))
        self._add(kind, sorted(set(texts)))
        return torch.from_numpy(self._emb[[self._rows[(kind, t)] for t in texts]])

    # ------------------------------------------------------------------ hooks
    def negatives_for(self, example: TrainingExample, rng: np.random.Generator) -> list[str]:
        n = self.options.hard_per_query
        if not n or not example.negatives:
            return []
        picks = rng.choice(len(example.negatives), size=min(n, len(example.negatives)), replace=False)
        return [example.negatives[i] for i in picks]

    def guide_scores(self, batch) -> torch.Tensor:
        """``[queries, global documents]`` guide similarities for a batch."""
        gq = self.guide_embeddings(batch.queries, "query")
        gd = self.guide_embeddings(batch.global_documents, "document")
        return gq @ gd.T

    def exclude_mask(self, batch, query_emb: torch.Tensor, doc_emb: torch.Tensor) -> torch.Tensor:
        scores = self.guide_scores(batch)
        targets = batch.targets.to(scores.device)
        rows = torch.arange(len(targets))
        mask = guide_mask(scores, scores[rows, targets], self.options.margin, self.options.margin_strategy)
        mask[rows, targets] = False
        self.masked += int(mask.sum())
        self.candidates += mask.numel() - len(targets)
        return mask

    def log_metrics(self) -> dict:
        frac = self.masked / self.candidates if self.candidates else 0.0
        self.masked = self.candidates = 0
        return {"gist_masked_fraction": round(frac, 5)}
