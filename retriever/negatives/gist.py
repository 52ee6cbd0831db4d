"""GISTEmbed: a frozen guide model flags in-batch false negatives, which leave the softmax.

The guide's embeddings of every training text are computed once (the guide is frozen, so they never
change) and looked up per batch: guided training costs one matrix product per step, not a forward pass
of a 110M-parameter guide. Texts the cache has not seen (none, with the shipped strategies) are
encoded on the fly and added.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from retriever.data import TrainingExample
from retriever.distributed import gather_objects, gather_with_grad
from retriever.losses.gist import GISTLoss
from retriever.negatives.base import NegativeStrategy, StrategyOptions, register_strategy

logger = logging.getLogger(__name__)


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

    def check_examples(self, examples: list[TrainingExample]) -> None:
        """``hard_per_query`` needs hard negatives in the data: none at all is an error, some missing a warning."""
        if not self.options.hard_per_query:
            return
        bare = sum(1 for ex in examples if not ex.negatives)
        if bare == len(examples):
            raise ValueError(f"negatives.options.hard_per_query is {self.options.hard_per_query} but the training "
                             "data has no hard negatives; set it to 0 (in-batch only) or train on mined data "
                             "(negatron mine)")
        if bare:
            logger.warning("GISTEmbed: %d of %d training queries have no hard negatives; they bring none into "
                           "their batch (hard_per_query=%d)", bare, len(examples), self.options.hard_per_query)

    def prepare(self, trainer: Any) -> None:
        self.check_examples(trainer.train_examples)
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

    @property
    def rule(self) -> GISTLoss:
        return GISTLoss(margin=self.options.margin, margin_strategy=self.options.margin_strategy)

    def exclude_mask(self, batch, query_emb: torch.Tensor, doc_emb: torch.Tensor) -> torch.Tensor:
        """Query–document block (positives and hard negatives of the global batch)."""
        scores = self.guide_scores(batch)
        (mask,) = self.rule.masks(scores, batch.targets.to(scores.device))
        self._count(mask, len(batch.targets))
        return mask

    def extra_candidates(self, batch, query_emb: torch.Tensor, doc_emb: torch.Tensor, dist_ctx):
        """The query–query and document–document blocks sentence-transformers' GISTEmbedLoss always adds:
        each query against every query of the global batch, and its positive against every positive,
        masked by the same guide threshold (the guide's query–positive score); a text is never its own
        negative, and copies of the query's own positives stay excluded as in the document block."""
        b = len(batch.queries)
        targets = batch.targets.to(doc_emb.device)
        offset = dist_ctx.rank * b  # this process's rows among the gathered queries / positives
        all_queries = gather_with_grad(query_emb, dist_ctx)
        pos_cols = torch.tensor([c for cols in gather_objects(batch.targets.tolist(), dist_ctx) for c in cols],
                                device=doc_emb.device)
        all_texts = [q for qs in gather_objects(batch.queries, dist_ctx) for q in qs]
        positive_texts = [batch.global_documents[c] for c in pos_cols.tolist()]
        own_positives = [batch.global_documents[c] for c in batch.targets.tolist()]

        gq = self.guide_embeddings(batch.queries, "query")
        g_all_q = self.guide_embeddings(all_texts, "query")
        gp = self.guide_embeddings(positive_texts, "document")
        g_own = gp[offset:offset + b]
        rows = torch.arange(b)
        guide_qd = gq @ gp.T  # only for the threshold: the guide's query–positive score at column offset + i
        _, qq, dd = self.rule.masks(guide_qd, rows + offset, gq @ g_all_q.T, g_own @ gp.T, self_columns=rows + offset)
        dd |= batch.exclude[:, pos_cols.cpu()]  # another query's positive with this query's positive's text
        self._count(qq, b, self_masked=True)
        self._count(dd, b, self_masked=True)
        sims = torch.cat([query_emb @ all_queries.T, doc_emb[targets] @ doc_emb[pos_cols].T], dim=1)
        return sims, torch.cat([qq, dd], dim=1)

    def _count(self, mask: torch.Tensor, self_entries: int, self_masked: bool = False) -> None:
        """Masked-fraction bookkeeping; each row's own entry (the target, or the text itself) is no candidate."""
        self.masked += int(mask.sum()) - (self_entries if self_masked else 0)
        self.candidates += mask.numel() - self_entries

    def log_metrics(self) -> dict:
        frac = self.masked / self.candidates if self.candidates else 0.0
        self.masked = self.candidates = 0
        return {"gist_masked_fraction": round(frac, 5)}
