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

With ``service_url`` no service is started: the main process queries an external ``negatron serve`` (another
process or GPU; :class:`RemoteService`) and asks it to refresh from the same snapshots, which it must read at
the same path. Its version numbers tag the answers; with ``wait_for_refresh`` a resumed run has the server
rebuild the checkpoint's index and equals an uninterrupted run except for those numbers (docs/strategies.md).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, model_validator

from mining.filters import MarginFilter
from retriever.data import TrainingExample
from retriever.negatives.base import NegativeStrategy, StrategyOptions, register_strategy
from retriever.negatives.corpus_index import IndexOptions, _same_corpus, build_index, corpus_path

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
    service_url: str | None = Field(None, description="base URL of an external `negatron serve` (e.g. "
                                    "http://gpu-host:8765) to query instead of starting a service in process; it "
                                    "must see <run>/ance/snapshots at the same path to refresh from them")

    @model_validator(mode="after")
    def _check(self) -> "ANCEOptions":
        if self.service_url is not None:
            from urllib.parse import urlsplit

            url = urlsplit(self.service_url)
            if url.scheme not in ("http", "https") or not url.hostname:
                raise ValueError(f"service_url must be an http(s) URL such as http://127.0.0.1:8765, got "
                                 f"{self.service_url!r}")
            # settings of the in-process index have no effect on an external server's: refused, not ignored
            keys = " and ".join(f"options.{key}" for key, default in (("index", IndexOptions()),
                                                                        ("encode_batch_size", 64))
                                if getattr(self, key) != default)
            if keys:
                raise ValueError(f"{keys} cannot be combined with options.service_url: the external server encodes "
                                 "and indexes with its own settings (`negatron index build` / `negatron serve`); "
                                 f"drop {keys} or options.service_url")
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
            if self.options.service_url:
                self._connect()
                self._start_remote_index()
            else:
                self._start_service(self._snapshot(0), version=1)
        self._prefetch(0)

    # ------------------------------------------------------------------ external service
    def _connect(self) -> None:
        """Open the external server (``service_url``) and refuse one this run cannot use."""
        from retriever.config import ConfigError

        remote = RemoteService(self.options.service_url)
        status = remote.status()
        if int(status["corpus_size"]) != len(self.corpus):
            remote.close()
            raise ConfigError(f"negatives.options.service_url: the server at {remote.base_url} indexes "
                              f"{int(status['corpus_size']):,} documents but this run's corpus ({self.corpus_file}, "
                              f"negatives.options.corpus) has {len(self.corpus):,}: serve the run's corpus")
        if self.options.wait_for_refresh and (status.get("watch_dir") or status.get("refresh_every_minutes")):
            remote.close()
            raise ConfigError("negatives.options.wait_for_refresh with negatives.options.service_url needs a server "
                              "that refreshes only when the run asks: the one at "
                              f"{remote.base_url} was started with --watch / --refresh-every, so its index "
                              "changes on its own; restart it without them or set wait_for_refresh: false")
        self.service = remote

    def _start_remote_index(self) -> None:
        """A fresh run starts from an index of its starting model: the server's as it is when the server was
        started with the run's ``model.name``, otherwise one built from the step-0 snapshot (waited for)."""
        status = self.service.wait_idle() if self.options.wait_for_refresh else self.service.status()
        if _same_path(status.get("model"), self.trainer.config.model.name):
            return
        snapshot = self._snapshot(0)
        logger.info("ANCE: the server at %s serves %s, not this run's starting model; building an index of %s",
                    self.service.base_url, status.get("model"), snapshot)
        self.service.refresh(snapshot, block=True, catch_up=True)

    def _start_service(self, snapshot: Path, version: int) -> None:
        """Serve ``snapshot``'s index of the corpus as ``version``. A resumed run finds the folder its first
        part built: the embeddings are kept only when they come from these very weights (the fingerprint; an
        index left by an earlier run may come from another model) and so is the index built from them; an
        encode cut by the kill continues from its finished shards. Anything else is re-encoded."""
        from mining.service import MiningService

        from retriever.checkpoint import preserved_rng
        from retriever.data import Corpus
        from retriever.modeling import BiEncoder

        index_dir = self.work_dir / f"index-v{version}"
        device = str(self.trainer.device)
        with preserved_rng():
            model = BiEncoder.from_pretrained(snapshot).to(device)
            build_index(model, Corpus(self.corpus_file), index_dir, batch_size=self.options.encode_batch_size,
                        bf16=self.trainer.bf16, distributed=False, options=self.options.index,
                        reuse_embeddings=snapshot.name == "step-0",  # the initial weights; later ones are newer
                        reuse_index=True, replace_stale=True)
        # the service loads the snapshot itself (its path names the step the version was built from)
        self.service = MiningService(index_dir / "index", str(snapshot), corpus=self.corpus_file,
                                     work_dir=self.work_dir / "versions", device=device,
                                     batch_size=self.options.encode_batch_size, bf16=self.trainer.bf16,
                                     first_version=version)

    def _snapshot(self, step: int) -> Path:
        from retriever.checkpoint import preserved_rng

        path = (self.work_dir / "snapshots" / f"step-{step}").resolve()  # absolute: an external server loads it
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
            same = getattr(self.service, "corpus", None) is not None and _same_corpus(self.service.corpus, self.corpus)
            for query, res in zip(chunk, results):
                # the in-process service answers with rows of the same corpus file: no id -> row lookups
                # (at 8.8M they kept the id maps resident, 67 MiB a file, seen in smaps of the running stage)
                rows = res.rows if same and res.rows is not None \
                    else self.corpus.rows([n.doc_id for n in res.negatives])
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
        if isinstance(self.service, RemoteService):  # one status read: version, step and model agree
            status = self.service.status()
            self._checkpointed_step = status.get("checkpoint_step")
            return {"index_version": int(status["version"]), "index_step": self._checkpointed_step,
                    "index_model": status.get("model"), "last_row": dict(self._last_row)}
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
            if self.options.service_url:
                self._connect()
                self._resume_remote_index(state, snapshot, step)
            elif state and ((snapshot / "modules.json").exists() or (snapshot / "negatron.json").exists()):
                self._start_service(snapshot, version=int(state["index_version"]))
            else:  # an older checkpoint, or its snapshot is gone: index and queries from the resumed weights
                logger.warning("ANCE resume: snapshot %s is missing; re-indexing with the checkpoint's weights",
                               snapshot)
                self._start_service(self._snapshot(step), version=int(state.get("index_version", 0)) + 1)
            self._checkpointed_step = self._live_step()
        self._prefetch(step)

    def _resume_remote_index(self, state: dict, snapshot: Path, step: int) -> None:
        """Make the external server serve the index the checkpoint's negatives came from: kept when it still
        does (same model path), else rebuilt from that model (the snapshot, or the server's starting model)
        and waited for; when that model is gone, from the resumed weights (as in process)."""
        target = state.get("index_model") or (str(snapshot.resolve()) if _is_model_dir(snapshot) else None)
        status = self.service.wait_idle()
        if target is not None and _same_path(status.get("model"), target):
            return
        if target is None or not Path(target).exists():
            logger.warning("ANCE resume: the checkpoint's index model %s is missing; re-indexing with the "
                           "checkpoint's weights", target)
            target = self._snapshot(step)
        self.service.refresh(target, block=True, catch_up=True)

    def _truncate_log(self, step: int) -> None:
        from retriever.io import write_text_atomic

        path = Path(self.trainer.output_dir) / LOG_FILE
        rows = [line for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
        write_text_atomic(path, "".join(line + "\n" for line in rows if json.loads(line)["step"] <= step))

    def close(self) -> None:
        """Let a running refresh (and its catch-up) finish and stop the service."""
        if self.service is not None:
            self.service.close(wait=True)


class RemoteService:
    """The trainer's view of an external ``negatron serve``: the in-process service's methods that ANCE uses
    (``mine``, ``refresh``, ``version``, ``checkpoint_step_of``, ``close``) over :class:`mining.client.MiningClient`.

    A blocking refresh is asked for without ``block`` and then polled (``/v1/status``) until the server serves
    that checkpoint, so no HTTP request stays open for the length of a corpus re-encode; ``close`` closes the
    connection only (the server keeps running)."""

    def __init__(self, base_url: str, timeout: float = 300.0, connect_wait: float = 30.0,
                 poll_seconds: float = 2.0):
        import httpx

        from mining.client import MiningClient

        self._client = MiningClient(base_url, timeout=timeout)
        self.base_url = self._client.base_url
        self._timeout = timeout
        self.poll_seconds = poll_seconds
        self.versions_seen: set[int] = set()
        self._steps: dict[int, int | None] = {}
        deadline = time.monotonic() + connect_wait
        while True:  # a server started beside the trainer may still be loading
            try:
                self.client.health()
                break
            except httpx.TransportError as exc:
                if time.monotonic() > deadline:
                    self._client.close()
                    raise ConnectionError(f"no mining server answers at {self.base_url} "
                                          f"(negatives.options.service_url): {exc}; start one with `negatron serve "
                                          "--index ... --model ... --corpus ...`") from exc
                time.sleep(0.5)

    @property
    def client(self):
        """The HTTP client, opened again after :meth:`close` (a checkpoint saved after the last step reads the
        server's status once more)."""
        if self._client._http.is_closed:
            from mining.client import MiningClient

            self._client = MiningClient(self.base_url, timeout=self._timeout)
        return self._client

    def status(self) -> dict:
        status = self.client.status()
        self._steps.update({int(v): s for v, s in (status.get("version_steps") or {}).items()})
        self._steps.setdefault(int(status["version"]), status.get("checkpoint_step"))
        return status

    @property
    def version(self) -> int:
        return int(self.status()["version"])

    def checkpoint_step_of(self, version: int) -> int | None:
        if version not in self._steps:
            self.status()
        return self._steps.get(version)

    def mine(self, queries, **options):
        results = self.client.mine(queries, **options)
        self.versions_seen.update(r.version for r in results)
        return results

    def refresh(self, checkpoint_path, block: bool = False, catch_up: bool = False) -> bool:
        started = self.client.refresh(checkpoint_path, block=False, catch_up=catch_up)
        if block:
            self.wait_for(str(checkpoint_path))
        return started

    def wait_for(self, model_path: str) -> dict:
        """Poll until the server serves an index built from ``model_path``; raise when its refreshes end
        without one (the build failed: the server's ``last_error`` is in the message)."""
        delay = 0.05
        while True:
            status = self.status()
            if status.get("model") == model_path:
                self.versions_seen.add(int(status["version"]))
                return status
            if not status.get("refresh_in_progress"):
                raise RuntimeError(f"the mining server at {self.base_url} did not build an index from {model_path}: "
                                   f"{status.get('last_error') or 'no refresh ran'}")
            time.sleep(delay)
            delay = min(delay * 2, self.poll_seconds)

    def wait_idle(self) -> dict:
        """Poll until no refresh is running (one asked for by an earlier run, say) and return the status."""
        delay = 0.05
        while True:
            status = self.status()
            if not status.get("refresh_in_progress"):
                return status
            time.sleep(delay)
            delay = min(delay * 2, self.poll_seconds)

    def close(self, wait: bool = True) -> None:
        """Close the connection; the server keeps running (and finishes any refresh it is building)."""
        self._client.close()


def _same_path(a, b) -> bool:
    if a is None or b is None:
        return False
    if str(a) == str(b):
        return True
    try:
        return Path(a).exists() and Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def _is_model_dir(path: Path) -> bool:
    return (path / "modules.json").exists() or (path / "negatron.json").exists()


def _snapshot_step(path: Path) -> int | None:
    name = Path(path).name
    return int(name[len("step-"):]) if name.startswith("step-") and name[len("step-"):].isdigit() else None
