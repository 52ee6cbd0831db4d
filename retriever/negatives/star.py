"""STAR: static hard negatives mined once by a warm-up model, plus random corpus negatives.

Zhan et al., "Optimizing Dense Retrieval Model Training with Hard Negatives", SIGIR 2021. Static hard
negatives alone make training unstable (they are a biased sample of the corpus); STAR mixes in random
negatives and reuses every document of the batch as a negative of every query, so each query sees
``batch × (1 + hard + random)`` candidates for the cost of encoding them once.

Hard negatives come, in order of preference, from the training data itself (a mined FlagEmbedding
JSONL, e.g. ``negatron mine`` output), from ``mined`` (such a JSONL, matched by query text), or are
mined up front: the warm-up model (default: the model being trained, before its first step) encodes the
corpus into a FAISS index and retrieves ranks ``[range_min, range_max)`` for every training query.
Positives are never negatives: they are excluded by id and by text, and the collator masks every
copy of a query's positives in the batch.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, model_validator

from retriever.data import Corpus, TrainingExample, iter_training_jsonl
from retriever.negatives.base import NegativeStrategy, StrategyOptions, register_strategy
from retriever.negatives.corpus_index import build_index, corpus_path, training_queries

logger = logging.getLogger(__name__)


class STAROptions(StrategyOptions):
    hard_per_query: int = Field(1, ge=0, description="static hard negatives per query per batch")
    random_per_query: int = Field(1, ge=0, description="random corpus negatives per query per batch")
    mined: str | None = Field(None, description="mined training JSONL supplying hard negatives (by query text)")
    warmup_model: str | None = Field(None, description="model that mines up front (default: the starting model)")
    corpus: str | None = Field(None, description="corpus for random negatives and mining (default: the data's)")
    range_min: int = Field(0, ge=0, description="first retrieval rank kept when mining up front")
    range_max: int = Field(100, gt=0, description="ranks >= range_max are not mined")
    mine_pool: int = Field(20, gt=0, description="hard negatives kept per query when mining up front")

    @model_validator(mode="after")
    def _check(self) -> "STAROptions":
        if self.hard_per_query + self.random_per_query == 0:
            raise ValueError("STAR needs hard_per_query or random_per_query > 0")
        if self.range_min >= self.range_max:
            raise ValueError(f"range_min ({self.range_min}) must be below range_max ({self.range_max})")
        return self


@register_strategy("star")
class STARNegatives(NegativeStrategy):
    Options = STAROptions

    def __init__(self, options=None):
        super().__init__(options)
        self.corpus: Corpus | None = None
        self.hard: dict[str, list[str]] = {}  # query text -> hard negative texts
        self.mined_up_front = 0

    def prepare(self, trainer: Any) -> None:
        self.corpus = Corpus(corpus_path(trainer, self.options.corpus))
        self.setup(trainer.train_examples, trainer.model, trainer.output_dir)

    def setup(self, examples: list[TrainingExample], model, work_dir: Path) -> None:
        """Collect hard negatives for ``examples``; mine them with the warm-up model where missing."""
        if self.options.mined:
            for ex in iter_training_jsonl(self.options.mined, self.corpus):
                if ex.negatives:
                    self.hard.setdefault(ex.query, []).extend(ex.negatives)
        for ex in examples:
            if ex.negatives:
                self.hard.setdefault(ex.query, list(ex.negatives))
        missing = [ex for ex in examples if ex.query not in self.hard]
        if self.options.hard_per_query and missing:
            self._mine(missing, model, Path(work_dir) / "star-warmup-index")

    def _mine(self, examples: list[TrainingExample], model, folder: Path) -> None:
        from mining.miner import DenseRetriever, MiningConfig, mine

        from retriever.modeling import BiEncoder

        warmup = BiEncoder.from_pretrained(self.options.warmup_model) if self.options.warmup_model else model
        logger.info("STAR: mining hard negatives for %d queries with the warm-up model", len(examples))
        dense, _ = build_index(warmup, self.corpus, folder)
        config = MiningConfig(k=self.options.range_max, range_min=self.options.range_min,
                              range_max=self.options.range_max, num_negatives=self.options.mine_pool, sampling="top")
        for mined in mine(training_queries(examples), self.corpus, DenseRetriever(dense, warmup), config):
            ex = examples[int(mined.query.query_id)]
            self.hard[ex.query] = [self.corpus.get(d).full_text for d in mined.negative_ids]
            self.mined_up_front += 1

    def _random(self, example: TrainingExample, rng: np.random.Generator, n: int) -> list[str]:
        positives = set(example.positive_ids)
        texts = {t.strip() for t in example.positives}
        out: list[str] = []
        while len(out) < n:
            doc = self.corpus[int(rng.integers(len(self.corpus)))]
            if doc.id not in positives and doc.full_text.strip() not in texts:
                out.append(doc.full_text)
        return out

    def negatives_for(self, example: TrainingExample, rng: np.random.Generator) -> list[str]:
        if self.corpus is None:
            raise RuntimeError("STARNegatives.prepare() must run before batches are collated")
        positives = {t.strip() for t in example.positives}
        out: list[str] = []
        n_hard = self.options.hard_per_query
        pool = [t for t in self.hard.get(example.query, []) if t.strip() not in positives]
        if n_hard:
            if not pool:
                raise ValueError(f"query {example.query_id or example.query[:60]!r} has no hard negatives "
                                 "(every mined candidate was a positive); raise range_max or mine_pool")
            picks = rng.choice(len(pool), size=n_hard, replace=len(pool) < n_hard)
            out += [pool[i] for i in picks]
        return out + self._random(example, rng, self.options.random_per_query)
