"""ANCE-style refreshed negatives: hard negatives for upcoming batches come from an in-process
:class:`mining.service.MiningService` whose index is rebuilt, asynchronously, from the newest model.

Xiong et al., "Approximate Nearest Neighbor Negative Contrastive Learning for Dense Text Retrieval",
ICLR 2021. Every ``refresh_every`` optimizer steps the current model is saved as
``<run>/ance/snapshots/step-<N>`` and the service re-encodes the corpus with it in a background thread,
swapping the new index in when done; training keeps going on the previous index meanwhile. After each
step the negatives of the next step's queries are mined in one request. Each negative carries the index
version that produced it, and ``<run>/negatives_log.jsonl`` records, per step, that version, the step of
the checkpoint it was built from and how many optimizer steps old it was.

Runs on one process (under torchrun every rank would run its own service).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, model_validator

from retriever.data import TrainingExample
from retriever.negatives.base import NegativeStrategy, StrategyOptions, register_strategy
from retriever.negatives.corpus_index import build_index, corpus_path

logger = logging.getLogger(__name__)
LOG_FILE = "negatives_log.jsonl"


class ANCEOptions(StrategyOptions):
    per_query: int = Field(1, gt=0, description="hard negatives per query in a batch")
    pool: int = Field(10, gt=0, description="top-ranked negatives kept per query, sampled from per batch")
    k: int = Field(100, gt=0, description="retrieval depth of each mining request")
    range_min: int = Field(0, ge=0, description="ranks below range_min are skipped (likely false negatives)")
    refresh_every: int = Field(100, gt=0, description="optimizer steps between index refreshes")
    wait_for_refresh: bool = Field(False, description="block training while the index rebuilds (reproducible)")
    corpus: str | None = Field(None, description="corpus to index (default: the data's)")
    encode_batch_size: int = Field(64, gt=0)

    @model_validator(mode="after")
    def _check(self) -> "ANCEOptions":
        if self.range_min + self.pool > self.k:
            raise ValueError(f"range_min + pool ({self.range_min + self.pool}) cannot exceed k ({self.k})")
        return self


@register_strategy("ance")
class ANCENegatives(NegativeStrategy):
    Options = ANCEOptions

    def __init__(self, options=None):
        super().__init__(options)
        self.service = None
        self.trainer = None
        self.work_dir: Path | None = None
        self.cache: dict[str, tuple[int, list[str]]] = {}   # query -> (index version, negative texts)
        self.positive_ids: dict[str, list[str]] = {}
        self.positive_texts: dict[str, set[str]] = {}
        self.versions_used: list[int] = []                   # versions behind the current step's negatives
        self.snapshot_step: dict[int, int] = {}              # index version -> checkpoint step
        self._last_row: dict = {}

    # ------------------------------------------------------------------ setup
    def prepare(self, trainer: Any) -> None:
        from mining.service import MiningService

        self.trainer = trainer
        self.work_dir = Path(trainer.output_dir) / self.name
        corpus = corpus_path(trainer, self.options.corpus)
        for ex in trainer.train_examples:
            self.positive_ids[ex.query] = list(ex.positive_ids)
            self.positive_texts[ex.query] = {t.strip() for t in ex.positives}
        start = self._snapshot(0)
        from retriever.data import Corpus

        index_dir = self.work_dir / "index-v1"
        if not (index_dir / "index").exists():
            build_index(trainer.model, Corpus(corpus), index_dir, batch_size=self.options.encode_batch_size)
        self.service = MiningService(index_dir / "index", str(start), corpus=corpus, work_dir=self.work_dir / "versions",
                                     batch_size=self.options.encode_batch_size)
        self.snapshot_step[1] = 0

    def _snapshot(self, step: int) -> Path:
        path = self.work_dir / "snapshots" / f"step-{step}"
        self.trainer.model.save(path)
        return path

    # ------------------------------------------------------------------ mining
    def mine(self, examples: list[TrainingExample]) -> None:
        """Mine negatives for ``examples`` (one request) into the cache."""
        todo = list({ex.query: ex for ex in examples}.values())
        for start in range(0, len(todo), 1024):
            chunk = todo[start:start + 1024]
            results = self.service.mine([ex.query for ex in chunk], k=self.options.k,
                                        exclude_ids=[self.positive_ids.get(ex.query, []) for ex in chunk],
                                        range_min=self.options.range_min, num_negatives=self.options.pool,
                                        sampling="top", with_texts=True)
            for ex, res in zip(chunk, results):
                pos = self.positive_texts.get(ex.query, set())
                self.cache[ex.query] = (res.version, [t for t in res.texts if t.strip() not in pos])

    def negatives_for(self, example: TrainingExample, rng: np.random.Generator) -> list[str]:
        if self.service is None:
            raise RuntimeError(f"{type(self).__name__}.prepare() must run before batches are collated")
        cached = self.cache.get(example.query)
        if cached is None:  # not prefetched: the first step, or after a resume
            self.mine([example])
            cached = self.cache[example.query]
        version, pool = cached
        if not pool:
            raise ValueError(f"no negative left for query {example.query[:60]!r} after removing positives; raise pool")
        self.versions_used.append(version)
        n = self.options.per_query
        picks = rng.choice(len(pool), size=n, replace=len(pool) < n)
        return [pool[i] for i in picks]

    def _upcoming_examples(self, step: int) -> list[TrainingExample]:
        """The examples of 0-based optimizer step ``step`` (the trainer's own order)."""
        from retriever.train_data import epoch_order

        t = self.trainer
        accum = t.config.training.gradient_accumulation_steps
        epoch, in_epoch = divmod(step, t.steps_per_epoch)
        order = t.strategy.epoch_order(len(t.train_examples), t.config.training.seed, epoch)
        if order is None:
            order = epoch_order(len(t.train_examples), t.config.training.seed, epoch)
        span = accum * t.global_batch
        return [t.train_examples[i] for i in order[in_epoch * span:(in_epoch + 1) * span]]

    # ------------------------------------------------------------------ hooks
    def on_step_end(self, step: int) -> None:
        self._log_step(step)
        total = self.trainer.total_steps
        if step % self.options.refresh_every == 0 and step < total:
            self._refresh(step)
        if step < total:
            self.mine(self._upcoming_examples(step))
        else:
            self.close()

    def _refresh(self, step: int) -> None:
        if self.service.refreshing:
            logger.info("step %d: the previous index refresh is still running; skipping this one", step)
            return
        path = self._snapshot(step)
        next_version = max(self.service.versions_seen) + 1
        self.snapshot_step[next_version] = step
        self.service.refresh(path, block=self.options.wait_for_refresh)
        self._prune_snapshots()

    def _prune_snapshots(self) -> None:
        """Delete snapshots no index can still be built from or serve (the live one and the newest stay)."""
        live = {self.snapshot_step.get(self.service.version), max(self.snapshot_step.values())}
        names = {f"step-{s}" for s in live if s is not None}
        for child in (self.work_dir / "snapshots").iterdir():
            if child.name not in names:
                shutil.rmtree(child, ignore_errors=True)

    def _log_step(self, step: int) -> None:
        versions = self.versions_used or [self.service.version]
        version = min(versions)
        built_at = self.snapshot_step.get(version, 0)
        self._last_row = {"step": step, "index_version": version, "index_step": built_at,
                          "index_age_steps": step - 1 - built_at}
        self.versions_used = []
        if self.trainer.dist.is_main:
            with open(Path(self.trainer.output_dir) / LOG_FILE, "a") as fh:
                fh.write(json.dumps(self._last_row) + "\n")

    def log_metrics(self) -> dict:
        return {k: v for k, v in self._last_row.items() if k != "step"}

    def close(self) -> None:
        """Let a running refresh finish and stop the service."""
        if self.service is not None:
            self.service.close(wait=True)
