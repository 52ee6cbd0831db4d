"""The mining service, in process: answer "give me hard negatives for these queries" from the current
index while a background thread re-encodes the corpus with newer checkpoints.

Versioning: each index the service has served gets a version number (1 = the index it started
with). A refresh builds the next version under ``work_dir/v<N>/`` off to the side, then swaps one
reference; a request reads that reference once, so it is answered entirely from one version, never
fails because of a refresh, and reports which version answered. Files of superseded versions are
deleted (the in-memory index stays alive for requests still using it); the starting index folder
belongs to the user and is never deleted.

Memory during a refresh (issue #13): one full index in private memory plus what the build needs. When a
refresh starts, the serving version (a CPU index whose file is on disk) is re-opened memory-mapped from
its ``index.faiss`` (FAISS ``IO_FLAG_MMAP_IFC``/``IO_FLAG_MMAP``) and swapped in under the same version
number, so its private copy is released while requests go on being answered from page-cache pages the
kernel can evict; the new version is built in memory from the memory-mapped float16 embedding shards and
served as built (never written and then read back as a second copy). A GPU index stays on its GPU while
the next one is built, so old and new coexist in GPU memory (float16: 6.8 GB each at 8.8M x 384); the
host holds only the transient CPU copy FAISS needs to write the file.

Device: the encoder runs on ``device``, default ``cuda:<LOCAL_RANK>`` when CUDA is available, else the
CPU. ``k`` is capped by the serving index's ``max_k`` (2,048 on a GPU FAISS index): a larger ``k`` is a
400 naming the limit.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from mining.filters import FILTER_NAMES, filter_candidates, positive_mask, sample_negatives
from mining.miner import RowIds, _rows_are_corpus_rows, encode_texts
from retriever.memory import release_file_pages
from retriever.offset_index import text_key

logger = logging.getLogger(__name__)

MAX_QUERIES_PER_REQUEST = 1024
_STEP_DIR = re.compile(r"^step-(\d+)$")


class MiningRequestError(ValueError):
    """A request the service cannot answer (unknown query id, margin without positives, ...)."""

    def __init__(self, message: str, status_code: int = 400):
        super().__init__(message)
        self.status_code = status_code


class MineRequest(BaseModel):
    """One mining request: the same fields in process and over HTTP (``POST /v1/mine``)."""

    model_config = ConfigDict(extra="forbid")

    queries: list[str] | None = Field(None, description="query texts (or give query_ids)")
    query_ids: list[str] | None = Field(None, description="ids of queries the service knows (from --corpus DATA)")
    k: int = Field(100, ge=1, le=10_000, description="candidates retrieved per query")
    exclude_ids: list[str] | list[list[str]] | None = Field(
        None, description="doc ids never returned: one list for all queries, or one list per query")
    positive_ids: list[list[str]] | None = Field(
        None, description="positives per query: excluded (by id and by text); their scores drive the margin filters")
    exclude_texts: list[list[str]] | None = Field(
        None, description="texts never returned, one list per query (e.g. positives known only by text)")
    range_min: int = Field(0, ge=0, description="first rank kept (0-based)")
    range_max: int | None = Field(None, ge=1, description="ranks >= range_max are dropped (default k)")
    num_negatives: int | None = Field(None, ge=1, description="negatives per query (default: all that pass)")
    sampling: Literal["top", "random"] = "top"
    relative_margin: float | None = Field(None, ge=0, lt=1)
    absolute_margin: float | None = Field(None, ge=0)
    with_texts: bool = False
    seed: int | None = None

    @model_validator(mode="after")
    def _check(self) -> "MineRequest":
        if (self.queries is None) == (self.query_ids is None):
            raise ValueError("give exactly one of queries (texts) or query_ids")
        items = self.queries if self.queries is not None else self.query_ids
        if not items:
            raise ValueError("the query list is empty")
        if len(items) > MAX_QUERIES_PER_REQUEST:
            raise ValueError(f"at most {MAX_QUERIES_PER_REQUEST} queries per request, got {len(items)}")
        if any(not str(t).strip() for t in items):
            raise ValueError("empty query text or id")
        range_max = self.range_max if self.range_max is not None else self.k
        if range_max > self.k:
            raise ValueError(f"range_max ({range_max}) cannot exceed k ({self.k})")
        if self.range_min >= range_max:
            raise ValueError(f"range_min ({self.range_min}) must be below range_max ({range_max})")
        per_query = self.exclude_ids is not None and len(self.exclude_ids) > 0 and isinstance(self.exclude_ids[0], list)
        if per_query and len(self.exclude_ids) != len(items):
            raise ValueError(f"exclude_ids has {len(self.exclude_ids)} lists for {len(items)} queries")
        if self.positive_ids is not None and len(self.positive_ids) != len(items):
            raise ValueError(f"positive_ids has {len(self.positive_ids)} lists for {len(items)} queries")
        if self.exclude_texts is not None and len(self.exclude_texts) != len(items):
            raise ValueError(f"exclude_texts has {len(self.exclude_texts)} lists for {len(items)} queries")
        return self


class Negative(NamedTuple):
    doc_id: str
    score: float
    rank: int


@dataclass
class MineResult:
    version: int
    negatives: list[Negative]
    query_id: str | None = None
    query: str | None = None
    texts: list[str] | None = None
    positive_score: float | None = None
    dropped: dict[str, int] = field(default_factory=dict)
    # the negatives' corpus rows, when the index rows are the service corpus's rows (in-process answers
    # only: an in-process caller on the same corpus then needs no id -> row lookup; HTTP answers carry ids)
    rows: np.ndarray | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        return {"version": self.version, "query_id": self.query_id, "query": self.query,
                "negatives": [n._asdict() for n in self.negatives], "texts": self.texts,
                "positive_score": self.positive_score, "dropped": self.dropped}

    @classmethod
    def from_dict(cls, data: dict) -> "MineResult":
        negs = [Negative(str(n["doc_id"]), float(n["score"]), int(n["rank"])) for n in data["negatives"]]
        return cls(int(data["version"]), negs, data.get("query_id"), data.get("query"), data.get("texts"),
                   data.get("positive_score"), dict(data.get("dropped") or {}))


@dataclass
class _IndexVersion:
    version: int
    index: object  # index.faiss_index.DenseIndex
    model: object  # retriever.modeling.BiEncoder
    model_path: str
    checkpoint_step: int | None
    folder: Path
    owned: bool  # built by the service (deleted when superseded)
    built_at: float
    encode_lock: threading.Lock = field(default_factory=threading.Lock)


def find_newest_checkpoint(watch_dir: str | Path) -> tuple[int, Path] | None:
    """The newest complete checkpoint under ``watch_dir``: a folder named ``step-<N>`` (directly inside
    it or in its ``checkpoints/``) holding a sentence-transformers model (``modules.json``) or a negatron
    two-tower model (``negatron.json``) at its root or in ``model/``. Returns (step, model folder)."""
    watch_dir = Path(watch_dir)
    best: tuple[int, Path] | None = None
    for parent in (watch_dir, watch_dir / "checkpoints"):
        if not parent.is_dir():
            continue
        for child in parent.iterdir():
            match = _STEP_DIR.match(child.name)
            if not match or not child.is_dir():
                continue
            for candidate in (child, child / "model"):
                if (candidate / "modules.json").is_file() or (candidate / "negatron.json").is_file():
                    step = int(match.group(1))
                    if best is None or step > best[0]:
                        best = (step, candidate)
                    break
    return best


def _step_of(path: str | Path) -> int | None:
    for part in reversed(Path(path).parts):
        match = _STEP_DIR.match(part)
        if match:
            return int(match.group(1))
    return None


def default_device() -> str:
    """``cuda:<LOCAL_RANK>`` when CUDA is available (the rank's own GPU under torchrun), else ``cpu``."""
    import os

    import torch

    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % max(torch.cuda.device_count(), 1)}"
    return "cpu"


def memory_mapped_copy(dense):
    """``dense`` re-opened from its own ``index.faiss`` memory-mapped (file-backed pages, not private
    memory), or None when it cannot be (a GPU index, no file, a file that no longer matches)."""
    import faiss

    from index.faiss_index import INDEX_FILE, DenseIndex

    if getattr(dense, "memory_mapped", False):
        return dense
    if getattr(dense, "_on_gpu", True) or getattr(dense, "folder", None) is None:
        return None
    path = Path(dense.folder) / INDEX_FILE
    expected = (dense.manifest or {}).get("index_bytes")
    if not path.is_file() or (expected is not None and path.stat().st_size != int(expected)):
        return None
    for flag in (faiss.IO_FLAG_MMAP_IFC, faiss.IO_FLAG_MMAP):
        try:
            index = faiss.read_index(str(path), flag | faiss.IO_FLAG_READ_ONLY)
        except RuntimeError:
            continue
        if index.ntotal == dense.count and index.d == dense.dim:
            mapped = DenseIndex(index, dense.ids, dict(dense.manifest), dense.folder)
            mapped.memory_mapped = True
            mapped.mapped_file = str(path)
            return mapped
    return None


def _iso(ts: float | None) -> str | None:
    return None if ts is None else _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).isoformat(timespec="seconds")


class MiningService:
    """Hard negatives on demand from a FAISS index that follows the training run.

    ``model`` is the bi-encoder that built ``index_dir`` (path or ``BiEncoder``). ``corpus`` is a
    corpus file or a BEIR folder: needed for refreshes (re-encoding), texts in answers, and — from a
    BEIR folder's ``queries.jsonl`` and ``qrels/<split>.tsv`` — query ids and their positives.
    ``watch_dir`` is polled every ``poll_seconds`` for a newer ``step-<N>`` checkpoint;
    ``refresh_every`` (minutes) re-encodes on a timer.
    """

    def __init__(self, index_dir: str | Path, model, corpus: str | Path | None = None,
                 watch_dir: str | Path | None = None, refresh_every: float | None = None, device: str | None = None,
                 *, queries: str | Path | dict | None = None, split: str = "train", work_dir: str | Path | None = None,
                 poll_seconds: float = 10.0, batch_size: int | None = None, bf16: bool | None = None,
                 first_version: int = 1):
        from index.faiss_index import DenseIndex

        from retriever.modeling import BiEncoder

        self.device = device or default_device()
        self.batch_size, self.bf16 = batch_size, bf16
        self.watch_dir = Path(watch_dir) if watch_dir else None
        self.refresh_every = refresh_every
        self.poll_seconds = poll_seconds
        index_dir = Path(index_dir)
        self.work_dir = Path(work_dir) if work_dir else index_dir.with_name(f"{index_dir.name}.versions")
        self.corpus, self.queries, self.qrels = _load_service_data(corpus, queries, split)

        if isinstance(model, BiEncoder):
            bi, model_path = model, str(getattr(model, "name", None) or "")
        else:
            bi, model_path = BiEncoder.from_pretrained(model), str(model)
        bi.to(self.device)
        dense = DenseIndex.load(index_dir, expect_dim=bi.dim)
        if self.corpus is not None and len(self.corpus) != dense.count:
            raise MiningRequestError(f"the corpus has {len(self.corpus):,} documents but the index {index_dir} holds "
                                     f"{dense.count:,}: pass the corpus the index was built from")
        manifest = dense.manifest or {}
        # a refresh rebuilds with the settings the served index was built with (`negatron index build`'s)
        self._build_settings = {"factory": str(manifest.get("factory", "Flat")), "metric": manifest.get("metric", "ip"),
                                "nprobe": manifest.get("nprobe"), "ef_search": manifest.get("ef_search"),
                                "train_sample": manifest.get("train_sample") or None}
        if first_version < 1:
            raise ValueError(f"first_version must be >= 1, got {first_version}")
        # first_version > 1: a resumed trainer continues its numbering (its logs name versions)
        self._current = _IndexVersion(first_version, dense, bi, model_path,
                                      _step_of(model_path) if model_path else None, index_dir, False, time.time())
        self._versions_seen = {first_version}
        self._version_steps = {first_version: self._current.checkpoint_step}
        self._pending: tuple[str | Path | None] | None = None  # a refresh asked for while one ran (catch-up)
        self._lock = threading.Lock()  # guards refresh start/finish bookkeeping, not reads
        self._refresh_thread: threading.Thread | None = None
        self._building = False  # set and cleared under _lock, so a catch-up request is never lost
        self._errors: list[BaseException] = []
        self._last_error: str | None = None
        self._last_refresh: float | None = None
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        if self.watch_dir is not None or refresh_every:
            if self.corpus is None:
                raise MiningRequestError("refreshing needs the corpus to re-encode: pass corpus=")
            self._watcher = threading.Thread(target=self._watch_loop, name="mining-watch", daemon=True)
            self._watcher.start()

    # ------------------------------------------------------------------ reads
    @property
    def version(self) -> int:
        return self._current.version

    @property
    def versions_seen(self) -> set[int]:
        return set(self._versions_seen)

    def checkpoint_step_of(self, version: int) -> int | None:
        """The checkpoint step (``step-<N>`` in its model path) index ``version`` was built from."""
        return self._version_steps.get(version)

    def status(self) -> dict:
        cur = self._current
        return {
            "version": cur.version,
            "checkpoint_step": cur.checkpoint_step,
            "model": cur.model_path,
            "corpus_size": int(cur.index.count),
            "index_dir": str(cur.folder),
            "built_at": _iso(cur.built_at),
            "last_refresh": _iso(self._last_refresh),
            "refresh_in_progress": self.refreshing,
            "last_error": self._last_error,
            "watch_dir": str(self.watch_dir) if self.watch_dir else None,
            "refresh_every_minutes": self.refresh_every,
            "max_k": getattr(cur.index, "max_k", None),
            "device": self.device,
            # every version served so far -> the checkpoint step it was built from (JSON keys are strings)
            "version_steps": {str(v): s for v, s in sorted(self._version_steps.items())},
        }

    @property
    def refreshing(self) -> bool:
        return self._building

    def mine(self, queries: Sequence[str] | None = None, query_ids: Sequence[str] | None = None, **options) -> list[MineResult]:
        """Negatives for each query (texts, or ids known from the service's data), best rank first.

        Options are the fields of :class:`MineRequest`: k, exclude_ids, positive_ids, range_min,
        range_max, num_negatives, sampling, relative_margin, absolute_margin, with_texts, seed.
        """
        req = MineRequest(queries=list(queries) if queries is not None else None,
                          query_ids=list(query_ids) if query_ids is not None else None, **options)
        return self.mine_request(req)

    def mine_request(self, req: MineRequest) -> list[MineResult]:
        state = self._current  # one read: the whole request is answered from this version
        texts, qids, positives = self._resolve_queries(req)
        n = len(texts)
        if isinstance(req.exclude_ids, list) and req.exclude_ids and isinstance(req.exclude_ids[0], list):
            excludes = [set(e) for e in req.exclude_ids]
        else:
            excludes = [set(req.exclude_ids or [])] * n
        wants_margin = req.relative_margin is not None or req.absolute_margin is not None
        max_k = getattr(state.index, "max_k", None)  # GPU FAISS returns at most 2,048 hits a query
        if max_k is not None and req.k > max_k:
            raise MiningRequestError(f"k={req.k} is more than this service's index returns per query (max_k={max_k}, "
                                     f"the GPU FAISS limit); ask for k <= {max_k}")
        if wants_margin and not any(positives):
            raise MiningRequestError("a margin filter needs positives: give positive_ids, or query_ids with qrels")
        with state.encode_lock:  # HF fast tokenizers are not safe to share across threads
            q_emb = encode_texts(state.model, texts, kind="query", batch_size=self.batch_size, bf16=self.bf16)
            pos_scores = self._positive_scores(state, q_emb, positives) if wants_margin else [None] * n
        scores, rows = state.index.search(q_emb, req.k)
        if getattr(state.index, "memory_mapped", False):
            # the old version is served from its file while the next is built: a search maps 2 MiB folios of
            # it at a time, and over a build's minutes they would add the whole old index to the process's
            # RSS beside the new one (8.8M passages: ~1.2 GB each). Unmap them; the page cache keeps them.
            release_file_pages(state.index.mapped_file)
        ids = state.index.ids
        rng = np.random.default_rng(req.seed)
        range_max = req.range_max if req.range_max is not None else req.k
        results = []
        # the index rows are the corpus's rows (it was encoded from it): filter by row and text key, decode the
        # chosen negatives' ids only (a step of ANCE at MS MARCO scale read 3,200 passages and ids otherwise)
        by_row = n > 0 and self.corpus is not None and _rows_are_corpus_rows(RowIds(rows[0][:0], ids), self.corpus)
        for i in range(n):
            valid = rows[i] >= 0
            cand_scores = np.asarray(scores[i][valid], dtype=np.float32)
            extra_texts = (req.exclude_texts or [[]] * n)[i]
            if by_row:
                cand = RowIds(rows[i][valid], ids)
                filt = filter_candidates(cand, cand_scores, exclude_mask=self._excluded_rows(
                                         cand.rows, range_max, excludes[i] | set(positives[i]), positives[i], extra_texts),
                                         range_min=req.range_min, range_max=range_max, pos_score=pos_scores[i],
                                         relative_margin=req.relative_margin, absolute_margin=req.absolute_margin)
            else:
                cand = [str(ids[r]) for r in rows[i][valid]]
                dupes = self._duplicates_of_positives(cand[:range_max], positives[i], extra_texts, len(cand))
                filt = filter_candidates(cand, cand_scores, exclude_ids=excludes[i] | set(positives[i]),
                                         exclude_mask=dupes,
                                         range_min=req.range_min, range_max=range_max, pos_score=pos_scores[i],
                                         relative_margin=req.relative_margin, absolute_margin=req.absolute_margin)
            chosen = filt.kept if req.num_negatives is None else sample_negatives(filt.kept, req.num_negatives, req.sampling, rng)
            names = cand.source.take(cand.rows[chosen]) if by_row and hasattr(cand.source, "take") \
                else [cand[p] for p in chosen]
            negs = [Negative(name, float(cand_scores[p]), int(p)) for name, p in zip(names, chosen)]
            doc_texts = None
            if req.with_texts:
                if self.corpus is None:
                    raise MiningRequestError("with_texts needs the service to know the corpus (start it with --corpus)")
                doc_texts = [self.corpus.get(neg.doc_id).full_text for neg in negs]
            results.append(MineResult(state.version, negs, qids[i] if qids else None, texts[i], doc_texts,
                                      pos_scores[i], {k: v for k, v in filt.dropped.items() if k in FILTER_NAMES},
                                      rows=cand.rows[chosen] if by_row else None))
        return results

    def _excluded_rows(self, rows: np.ndarray, range_max: int, exclude_ids: set[str], positive_ids: list[str],
                       texts: list[str]) -> np.ndarray:
        """:meth:`_duplicates_of_positives` and the id exclusion by corpus row and text key: True for
        candidates that are excluded ids or whose text equals a positive's or one of ``texts``."""
        corpus = self.corpus
        mask = np.isin(rows, corpus.rows([d for d in exclude_ids if isinstance(d, str)]))
        wanted = [text_key(t.strip()) for t in texts]
        wanted += corpus.text_keys([r for r in corpus.rows(positive_ids).tolist() if r >= 0]).tolist()
        if wanted:
            window = rows[:range_max]
            mask[:len(window)] |= np.isin(corpus.text_keys(window), wanted)
        return mask

    def _duplicates_of_positives(self, window_ids: list[str], positive_ids: list[str], texts: list[str],
                                 n: int) -> np.ndarray | None:
        """True for candidates (of ``n``; only the rank window is read) whose text equals a positive's or
        one of ``texts``: exact duplicates under another id (MS MARCO has many) are never negatives."""
        wanted = list(texts)
        if self.corpus is not None:
            wanted += [self.corpus.get(d).full_text for d in positive_ids if d in self.corpus]
        if not wanted:
            return None
        if self.corpus is None:
            raise MiningRequestError("exclude_texts needs the service to know the corpus (start it with --corpus)")
        mask = np.zeros(n, dtype=bool)
        window_texts = self.corpus.texts(self.corpus.row(d) for d in window_ids)
        mask[:len(window_ids)] = positive_mask(window_ids, window_texts, (), wanted)
        return mask

    def _resolve_queries(self, req: MineRequest) -> tuple[list[str], list[str] | None, list[list[str]]]:
        if req.query_ids is not None:
            if self.queries is None:
                raise MiningRequestError("query_ids need the service to know the queries: start it with a BEIR folder "
                                         "as corpus, or pass queries=; or send query texts")
            missing = [q for q in req.query_ids if q not in self.queries]
            if missing:
                raise MiningRequestError(f"unknown query ids {missing[:5]}", status_code=404)
            texts, qids = [self.queries[q] for q in req.query_ids], list(req.query_ids)
            judged = [[d for d, g in (self.qrels or {}).get(q, {}).items() if g > 0] for q in qids]
        else:
            texts, qids, judged = list(req.queries), None, [[] for _ in req.queries]
        if req.positive_ids is not None:
            judged = [list(p) for p in req.positive_ids]
        return texts, qids, judged

    def _positive_scores(self, state: _IndexVersion, q_emb: np.ndarray, positives: list[list[str]]) -> list[float | None]:
        """Lowest positive score per query under the serving model (None without positives)."""
        flat = [(i, d) for i, pos in enumerate(positives) for d in pos]
        if not flat:
            return [None] * len(positives)
        if self.corpus is None:
            raise MiningRequestError("margin filters need the corpus to embed the positives (start with --corpus)")
        unknown = [d for _, d in flat if d not in self.corpus]
        if unknown:
            raise MiningRequestError(f"unknown positive ids {unknown[:5]}", status_code=404)
        emb = encode_texts(state.model, self.corpus.texts(self.corpus.row(d) for _, d in flat), kind="document",
                           batch_size=self.batch_size, bf16=self.bf16)
        if (state.index.manifest or {}).get("metric") == "cosine":  # score as the index does
            emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
            q_emb = q_emb / np.maximum(np.linalg.norm(q_emb, axis=1, keepdims=True), 1e-12)
        out: list[float | None] = [None] * len(positives)
        for (i, _), e in zip(flat, emb):
            s = float(e @ q_emb[i])
            out[i] = s if out[i] is None else min(out[i], s)
        return out

    # ------------------------------------------------------------------ refresh
    def refresh(self, checkpoint_path: str | Path | None = None, block: bool = False, catch_up: bool = False) -> bool:
        """Re-encode the corpus (with ``checkpoint_path``, default the current model) and swap the index in.

        Returns False when a refresh is already running: nothing new is started, unless ``catch_up``,
        which remembers ``checkpoint_path`` (replacing an older remembered one) and builds it as soon as
        the running refresh ends, so a refresh that fell due meanwhile is not lost and the service always
        ends on the newest checkpoint asked for. With ``block`` the call waits (for the catch-up build
        too) and re-raises a failed build's error.
        """
        if self.corpus is None:
            raise MiningRequestError("refreshing needs the corpus to re-encode: start the service with corpus=")
        if checkpoint_path is not None and not Path(checkpoint_path).exists():
            raise MiningRequestError(f"checkpoint {checkpoint_path} does not exist", status_code=404)
        with self._lock:
            running = self._building
            if running:
                if catch_up:
                    self._pending = (checkpoint_path,)
            else:
                self._building = True
                self._errors = []
                self._refresh_thread = threading.Thread(target=self._refresh_worker,
                                                        args=(checkpoint_path, self._errors),
                                                        name="mining-refresh", daemon=True)
                self._refresh_thread.start()
            thread, errors = self._refresh_thread, self._errors
        if running and not (block and catch_up):
            return False
        if block:
            thread.join()
            if errors:
                raise errors[-1]
        return not running

    def _refresh_worker(self, checkpoint_path, errors: list) -> None:
        while True:
            try:
                self._rebuild(checkpoint_path)
                self._last_error = None
            except BaseException as exc:  # keep serving the old version; report the failure in status()
                logger.exception("index refresh failed")
                self._last_error = f"{type(exc).__name__}: {exc}"
                errors.append(exc)
            with self._lock:  # a refresh asked for meanwhile: build the newest one now (catch-up)
                if self._pending is None:
                    self._building = False
                    return
                (checkpoint_path,), self._pending = self._pending, None

    def _rebuild(self, checkpoint_path) -> None:
        from index.encode import encode_or_resume
        from index.faiss_index import DenseIndex

        from retriever.modeling import BiEncoder

        old = self._current  # read its fields only: holding it would keep its index alive through the build
        model_path = str(checkpoint_path) if checkpoint_path is not None else old.model_path
        old_step = old.checkpoint_step
        del old
        if not model_path:
            raise MiningRequestError("the service was given a model object, so a refresh needs checkpoint_path")
        version = max(self._versions_seen) + 1
        folder = self.work_dir / f"v{version}"
        # a killed build's leftovers go, except the shards its encode finished: a build of the same weights
        # (a resumed ANCE run refreshing from the same snapshot) keeps them, others are replaced
        for leftover in folder.iterdir() if folder.is_dir() else ():
            if leftover.is_dir() and leftover.name != "embeddings":
                shutil.rmtree(leftover, ignore_errors=True)
            elif not leftover.is_dir():
                leftover.unlink()
        t0 = time.perf_counter()
        model = BiEncoder.from_pretrained(model_path)
        model.to(self.device)
        store = encode_or_resume(model, self.corpus, folder / "embeddings", batch_size=self.batch_size,
                                 bf16=self.bf16, show_progress=False, distributed=False)
        self._serve_from_disk()  # the old version's private copy goes before the new one is built
        # built from the memory-mapped float16 shards and served as built: no second read of the written file
        dense = DenseIndex.build(store, folder / "index", distributed=False, **self._build_settings)
        if dense.dim != model.dim:
            raise MiningRequestError(f"the rebuilt index holds {dense.dim}-d vectors but the model produces {model.dim}-d")
        step = _step_of(model_path) if checkpoint_path is not None else old_step
        new = _IndexVersion(version, dense, model, model_path, step, folder, True, time.time())
        with self._lock:
            self._versions_seen.add(version)
            self._version_steps[version] = step
            self._current = new  # the swap: one reference assignment
            self._last_refresh = time.time()
        logger.info("index version %d (step %s) built in %.1f s", version, step, time.perf_counter() - t0)
        self._cleanup(keep=folder)

    def _serve_from_disk(self) -> None:
        """Swap the serving version for the same index memory-mapped from its file (same version number,
        same answers), so a refresh holds one full index in private memory: the one it builds."""
        cur = self._current
        mapped = memory_mapped_copy(cur.index)
        if mapped is None or mapped is cur.index:
            return
        with self._lock:
            if self._current is cur:
                self._current = dataclasses.replace(cur, index=mapped)
        logger.info("serving version %d memory-mapped from %s while the next version is built", cur.version, cur.folder)

    def _cleanup(self, keep: Path) -> None:
        if not self.work_dir.is_dir():
            return
        for child in self.work_dir.iterdir():
            if child != keep and child.is_dir() and re.match(r"^v\d+$", child.name):
                shutil.rmtree(child, ignore_errors=True)

    def _watch_loop(self) -> None:
        last_timer = time.monotonic()
        while not self._stop.wait(self.poll_seconds):
            try:
                if self.refreshing:
                    continue
                if self.watch_dir is not None:
                    newest = find_newest_checkpoint(self.watch_dir)
                    current = self._current.checkpoint_step
                    if newest is not None and (current is None or newest[0] > current):
                        logger.info("new checkpoint step %d at %s: refreshing", *newest)
                        self.refresh(newest[1])
                        last_timer = time.monotonic()
                        continue
                if self.refresh_every and time.monotonic() - last_timer >= self.refresh_every * 60:
                    self.refresh()
                    last_timer = time.monotonic()
            except Exception:  # a bad checkpoint folder must not kill the watcher
                logger.exception("checkpoint watcher")

    def close(self, wait: bool = True) -> None:
        """Stop the watcher; with ``wait``, let a running refresh finish."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=self.poll_seconds + 5)
        thread = self._refresh_thread
        if wait and thread is not None:
            thread.join()

    def __enter__(self) -> "MiningService":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _load_service_data(corpus, queries, split):
    """(Corpus | None, {qid: text} | None, qrels | None) from a BEIR folder or a corpus file."""
    from retriever.data import Corpus, read_qrels, read_queries

    docs = qmap = qrels = None
    if corpus is not None:
        corpus = Path(corpus)
        if corpus.is_dir():
            docs = Corpus(corpus / "corpus.jsonl")
            if (corpus / "queries.jsonl").is_file():
                qmap = read_queries(corpus / "queries.jsonl")
            if (corpus / "qrels" / f"{split}.tsv").is_file():
                qrels = read_qrels(corpus / "qrels" / f"{split}.tsv")
        else:
            docs = Corpus(corpus)
    if isinstance(queries, dict):
        qmap = dict(queries)
    elif queries is not None:
        qmap = read_queries(queries)
    return docs, qmap, qrels
