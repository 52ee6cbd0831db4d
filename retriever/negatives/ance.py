"""ANCE-style refreshed negatives: hard negatives for upcoming batches come from an in-process
:class:`mining.service.MiningService` whose index is rebuilt, asynchronously, from the newest model.

Xiong et al., "Approximate Nearest Neighbor Negative Contrastive Learning for Dense Text Retrieval",
ICLR 2021. Every ``refresh_every`` optimizer steps the current model is saved as
``<run>/ance/snapshots/step-<N>`` and the service re-encodes the corpus with it (on the trainer's device)
in a background thread, swapping the new index in when done; training keeps going on the previous index
meanwhile. A refresh that falls due while another is still running is not dropped: the service builds
the newest snapshot asked for as soon as the running build ends (catch-up). After each step the negatives
of the next step's queries are mined in one request: the top ``k`` (200, as the paper) minus positives
(by id and by text) and the optional margin filter of ``negatron mine``; each query's ``per_query``
negatives are drawn at random from them (the paper's sampling). Each negative carries the index version
that produced it, and ``<run>/negatives_log.jsonl`` records, per step, that version, the step of the
snapshot it was built from and how many optimizer steps old it was.

Resume: the checkpoint records which snapshot the live index came from; a resumed run rebuilds the index
from that snapshot (kept on disk for the newest checkpoint), so queries and index come from the same
model and, with ``wait_for_refresh``, the negatives equal the uninterrupted run's.

Under torchrun one service on the main process serves every rank: it mines the next step's negatives and
broadcasts them, so all ranks build the same global batch.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, model_validator

from mining.filters import MarginFilter
from retriever.data import TrainingExample
from retriever.negatives.base import NegativeStrategy, StrategyOptions, register_strategy
from retriever.negatives.corpus_index import IndexOptions, build_index, corpus_path

logger = logging.getLogger(__name__)
LOG_FILE = "negatives_log.jsonl"


class ANCEOptions(MarginFilter, StrategyOptions):
    per_query: int = Field(1, gt=0, description="hard negatives per query in a batch, drawn at random from the pool")
    pool: int | None = Field(None, gt=0, description="best-ranked negatives kept per query as the pool to sample "
                             "from (default: every candidate of the top k that passes the filters, as the paper)")
    k: int = Field(200, gt=0, description="retrieval depth of each mining request (the paper: top 200)")
    range_min: int = Field(0, ge=0, description="ranks below range_min are skipped (likely false negatives)")
    refresh_every: int = Field(100, gt=0, description="optimizer steps between index refreshes")
    wait_for_refresh: bool = Field(False, description="block training while the index rebuilds (reproducible)")
    corpus: str | None = Field(None, description="corpus to index (default: the data's)")
    encode_batch_size: int = Field(64, gt=0)
    index: IndexOptions = Field(default_factory=IndexOptions, description="FAISS settings of the first index "
                                "(factory, nprobe, ef_search, train_sample, gpu; default factory auto); "
                                "refreshes rebuild with the same factory")

    @model_validator(mode="after")
    def _check(self) -> "ANCEOptions":
        if self.range_min >= self.k:
            raise ValueError(f"range_min ({self.range_min}) must be below k ({self.k})")
        if self.pool is not None and self.range_min + self.pool > self.k:
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
        self.corpus_file: Path | None = None
        self.corpus = None
        # query -> (index version, negatives' corpus rows, int32): the upcoming step's queries only; the
        # texts of the ``per_query`` picks are read from the corpus when the batch is collated
        self.cache: dict[str, tuple[int, np.ndarray]] = {}
        self.versions_used: list[int] = []                   # versions behind the current step's negatives
        self._checkpointed_step: int | None = None            # snapshot behind the newest checkpoint's index
        self._last_row: dict = {}

    @property
    def _dist(self):
        return self.trainer.dist

    # ------------------------------------------------------------------ setup
    def prepare(self, trainer: Any) -> None:
        self.trainer = trainer
        self.work_dir = Path(trainer.output_dir) / self.name
        self.corpus_file = corpus_path(trainer, self.options.corpus)
        from retriever.data import Corpus

        self.corpus = Corpus(self.corpus_file)
        if getattr(trainer, "resume_from", None) is not None:
            return  # load_state_dict starts the service from the checkpoint's snapshot
        if self._dist.is_main:
            self._start_service(self._snapshot(0), version=1)
        self._prefetch(0)

    def _start_service(self, snapshot: Path, version: int) -> None:
        """Encode the corpus with ``snapshot`` (always: an index left by an earlier run may come from
        another model) and serve it as ``version``."""
        from mining.service import MiningService

        from retriever.checkpoint import preserved_rng
        from retriever.data import Corpus
        from retriever.modeling import BiEncoder

        index_dir = self.work_dir / f"index-v{version}"
        shutil.rmtree(index_dir, ignore_errors=True)
        device = str(self.trainer.device)
        with preserved_rng():
            model = BiEncoder.from_pretrained(snapshot).to(device)
            build_index(model, Corpus(self.corpus_file), index_dir, batch_size=self.options.encode_batch_size,
                        bf16=self.trainer.bf16, distributed=False, options=self.options.index)
        # the service loads the snapshot itself (its path names the step the version was built from)
        self.service = MiningService(index_dir / "index", str(snapshot), corpus=self.corpus_file,
                                     work_dir=self.work_dir / "versions", device=device,
                                     batch_size=self.options.encode_batch_size, bf16=self.trainer.bf16,
                                     first_version=version)

    def _snapshot(self, step: int) -> Path:
        from retriever.checkpoint import preserved_rng

        path = self.work_dir / "snapshots" / f"step-{step}"
        with preserved_rng():
            self.trainer.model.save(path)
        return path

    # ------------------------------------------------------------------ mining
    def mine(self, examples: list[TrainingExample]) -> dict[str, tuple[int, np.ndarray]]:
        """Mine negatives for ``examples`` (requests of up to 1024 queries) on the main process: per query
        text, the index version and the negatives' corpus rows. Examples sharing a query text are mined once,
        with the union of their positives."""
        todo: dict[str, tuple[list[str], list[str]]] = {}
        for ex in examples:
            ids, texts = todo.setdefault(ex.query, ([], []))
            ids.extend(d for d in ex.positive_ids if d not in ids)
            texts.extend(t for t in ex.positives if t not in texts)
        queries = list(todo)
        out: dict[str, tuple[int, np.ndarray]] = {}
        for start in range(0, len(queries), 1024):
            chunk = queries[start:start + 1024]
            positive_ids = [todo[q][0] for q in chunk]
            o = self.options
            margins = {"relative_margin": o.relative_margin, "absolute_margin": o.absolute_margin} \
                if o.has_margin and any(positive_ids) else {}
            results = self.service.mine(chunk, k=self.options.k, positive_ids=positive_ids,
                                        exclude_texts=[todo[q][1] for q in chunk],
                                        range_min=self.options.range_min, num_negatives=self.options.pool,
                                        sampling="top", **margins)
            for query, res in zip(chunk, results):
                rows = self.corpus.rows([n.doc_id for n in res.negatives])
                out[query] = (res.version, rows.astype(np.int32 if len(self.corpus) < 2**31 else np.int64))
        return out

    def _prefetch(self, step: int) -> None:
        """Negatives for 0-based optimizer step ``step``: mined by the main process, broadcast to all."""
        from retriever.distributed import gather_objects

        answer = self.mine(self._upcoming_examples(step)) if self._dist.is_main else None
        if self._dist.enabled:
            answer = gather_objects(answer, self._dist)[0]  # every rank takes the main process's answer
        self.cache = answer  # the upcoming step's queries only: the cache never grows with the run

    def negatives_for(self, example: TrainingExample, rng: np.random.Generator) -> list[str]:
        if self.trainer is None:
            raise RuntimeError(f"{type(self).__name__}.prepare() must run before batches are collated")
        cached = self.cache.get(example.query)
        if cached is None:
            if self.service is None:  # another rank: it can only use what the main process broadcast
                raise RuntimeError(f"no negatives were broadcast for query {example.query[:60]!r}")
            self.cache.update(self.mine([example]))
            cached = self.cache[example.query]
        version, pool = cached
        if not len(pool):
            raise ValueError(f"no negative left for query {example.query[:60]!r} after the filters; raise k or "
                             "lower range_min / the margin")
        self.versions_used.append(version)
        n = self.options.per_query
        picks = rng.choice(len(pool), size=n, replace=len(pool) < n)
        return self.corpus.texts(pool[i] for i in picks)

    def pool_texts(self, query: str) -> tuple[int, list[str]] | None:
        """``(index version, texts)`` of ``query``'s cached negatives (texts read from the corpus), or None."""
        cached = self.cache.get(query)
        return None if cached is None else (cached[0], self.corpus.texts(cached[1]))

    def _upcoming_examples(self, step: int) -> list[TrainingExample]:
        """The examples of 0-based optimizer step ``step`` (the trainer's own order)."""
        return self.trainer.step_examples(step)

    # ------------------------------------------------------------------ hooks
    def on_step_end(self, step: int) -> None:
        total = self.trainer.total_steps
        if self._dist.is_main:
            self._log_step(step)
            if step % self.options.refresh_every == 0 and step < total:
                self._refresh(step)
        self.versions_used = []
        if step < total:
            self._prefetch(step)
        else:
            self.close()

    def _refresh(self, step: int) -> None:
        path = self._snapshot(step)
        started = self.service.refresh(path, block=self.options.wait_for_refresh, catch_up=True)
        if not started:
            logger.info("step %d: an index refresh is still running; step %d's snapshot is built right after it",
                        step, step)
        self._prune_snapshots()

    def _live_step(self) -> int | None:
        return self.service.checkpoint_step_of(self.service.version)

    def _prune_snapshots(self) -> None:
        """Delete snapshots nothing needs: keep the live index's, those newer than it (being built or
        waiting for a catch-up build) and the one the newest checkpoint's index came from."""
        live = self._live_step()
        for child in (self.work_dir / "snapshots").iterdir():
            step = _snapshot_step(child)
            if step is None or live is None or step >= live or step == self._checkpointed_step:
                continue
            shutil.rmtree(child, ignore_errors=True)

    def _log_step(self, step: int) -> None:
        versions = self.versions_used or [self.service.version]
        version = min(versions)
        built_at = self.service.checkpoint_step_of(version) or 0
        self._last_row = {"step": step, "index_version": version, "index_step": built_at,
                          "index_age_steps": step - 1 - built_at}
        with open(Path(self.trainer.output_dir) / LOG_FILE, "a") as fh:
            fh.write(json.dumps(self._last_row) + "\n")

    def log_metrics(self) -> dict:
        return {k: v for k, v in self._last_row.items() if k != "step"}

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        """Called on the main process when a checkpoint is saved: which snapshot and version serve now."""
        if self.service is None:
            return {}
        self._checkpointed_step = self._live_step()
        return {"index_version": self.service.version, "index_step": self._checkpointed_step,
                "last_row": dict(self._last_row)}

    def load_state_dict(self, state: dict) -> None:
        """Resume: serve the checkpoint's index again, rebuilt from its snapshot, and mine the next step."""
        from retriever.checkpoint import load_position

        step = load_position(self.trainer.resume_from).step
        if self._dist.is_main:
            self._truncate_log(step)
            self._last_row = dict(state.get("last_row") or {})
            snapshot = self.work_dir / "snapshots" / f"step-{state.get('index_step')}"
            if state and ((snapshot / "modules.json").exists() or (snapshot / "negatron.json").exists()):
                self._start_service(snapshot, version=int(state["index_version"]))
            else:  # an older checkpoint, or its snapshot is gone: index and queries from the resumed weights
                logger.warning("ANCE resume: snapshot %s is missing; re-indexing with the checkpoint's weights",
                               snapshot)
                self._start_service(self._snapshot(step), version=int(state.get("index_version", 0)) + 1)
            self._checkpointed_step = self._live_step()
        self._prefetch(step)

    def _truncate_log(self, step: int) -> None:
        from retriever.io import write_text_atomic

        path = Path(self.trainer.output_dir) / LOG_FILE
        rows = [line for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
        write_text_atomic(path, "".join(line + "\n" for line in rows if json.loads(line)["step"] <= step))

    def close(self) -> None:
        """Let a running refresh (and its catch-up) finish and stop the service."""
        if self.service is not None:
            self.service.close(wait=True)


def _snapshot_step(path: Path) -> int | None:
    name = Path(path).name
    return int(name[len("step-"):]) if name.startswith("step-") and name[len("step-"):].isdigit() else None
