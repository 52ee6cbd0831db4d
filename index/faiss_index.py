"""A FAISS index over an :class:`~index.store.EmbeddingStore`, saved with its ids and a manifest.

Folder layout: ``index.faiss`` (CPU form), ``ids.txt`` (row -> doc id), ``manifest.json``.

IVF sizing: FAISS wants at least 39 training points per centroid. When the corpus is too small for
the requested ``nlist`` we clamp ``nlist`` to ``count // 39`` and log a warning (the factory actually
used is recorded in the manifest), rather than fail: a small corpus with a big-corpus recipe should
still index, and the manifest tells the truth about what was built.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from retriever.data import DataError
from retriever.io import atomic_dir

from index.store import EmbeddingStore, read_ids

logger = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
IDS_FILE = "ids.txt"
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
MIN_POINTS_PER_CENTROID = 39
DEFAULT_NPROBE = 64
DEFAULT_EF_SEARCH = 128
_REBUILD = "rebuild it with `negatron index build --embeddings DIR --output {dir}`"


class CorruptIndexError(DataError):
    """A dense index folder is missing, corrupt or does not match what the caller expects."""


def _clamp_ivf(factory: str, count: int) -> str:
    match = re.match(r"^(IVF)(\d+)(.*)$", factory)
    if not match:
        return factory
    nlist = int(match.group(2))
    max_nlist = max(1, count // MIN_POINTS_PER_CENTROID)
    if nlist <= max_nlist:
        return factory
    clamped = f"IVF{max_nlist}{match.group(3)}"
    logger.warning("%d vectors are too few to train %d IVF lists (FAISS wants >= %d per list); using %r instead. "
                   "Pass a smaller nlist to silence this.", count, nlist, MIN_POINTS_PER_CENTROID, clamped)
    return clamped


def _nlist(index) -> int | None:
    import faiss

    try:
        return faiss.extract_index_ivf(index).nlist
    except (RuntimeError, AttributeError):
        return None


def _hnsw(index):
    import faiss

    try:
        return faiss.downcast_index(index).hnsw if hasattr(faiss.downcast_index(index), "hnsw") else None
    except RuntimeError:
        return None


def _normalized(x: np.ndarray) -> np.ndarray:
    x = np.array(x, dtype=np.float32, copy=True, order="C")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x /= np.maximum(norms, 1e-12)
    return x


def _model_matches(expect, manifest: dict) -> bool:
    """``expect`` is a model name/path, a checkpoint hash, or a BiEncoder."""
    if hasattr(expect, "tower"):  # a BiEncoder: compare weights, not names
        from index.encode import model_fingerprint

        return model_fingerprint(expect, "document") == manifest.get("checkpoint_hash")
    expect = str(expect)
    if expect in (manifest.get("model"), manifest.get("checkpoint_hash")):
        return True
    from retriever.resolve import resolve_model

    try:
        return Path(resolve_model(expect)).resolve() == Path(resolve_model(manifest.get("model", ""))).resolve()
    except (OSError, ValueError):
        return False


class DenseIndex:
    """Exact (``Flat``) or approximate (``HNSW32``, ``IVF4096,Flat``, ``IVF4096,PQ64``) inner-product search."""

    def __init__(self, index, ids: list[str], manifest: dict, folder: Path | None = None):
        self.index = index
        self.ids = ids
        self.manifest = manifest
        self.folder = folder
        self.set_search_params(nprobe=manifest.get("nprobe"), ef_search=manifest.get("ef_search"))

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def count(self) -> int:
        return int(self.manifest["count"])

    # ------------------------------------------------------------------ build
    @classmethod
    def build(cls, store_or_dir: EmbeddingStore | str | os.PathLike, output_dir: str | os.PathLike, factory: str = "Flat",
              metric: str = "ip", train_sample: int | None = None, use_gpu: bool | str = "auto",
              nprobe: int | None = None, ef_search: int | None = None, seed: int = 0) -> "DenseIndex":
        """Build from an embeddings folder and save to ``output_dir`` atomically.

        ``metric="cosine"`` L2-normalises documents (and, at search time, queries) and uses inner product.
        ``train_sample``: vectors used to train IVF/PQ (default ``min(count, 256 * nlist)``, at least 100k when available).
        """
        import faiss

        if metric not in ("ip", "cosine"):
            raise ValueError(f"metric must be 'ip' or 'cosine', not {metric!r}")
        store = store_or_dir if isinstance(store_or_dir, EmbeddingStore) else EmbeddingStore.open(store_or_dir)
        started = time.perf_counter()
        used_factory = _clamp_ivf(factory, store.count)
        try:
            cpu_index = faiss.index_factory(store.dim, used_factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            raise ValueError(f"FAISS cannot build factory {factory!r} for {store.dim}-d vectors: "
                             f"{str(exc).strip().splitlines()[-1]}. Try 'Flat', 'HNSW32', 'IVF4096,Flat' or "
                             f"'IVF4096,PQ{store.dim // 8}' (PQ sub-quantisers must divide the dimension)") from None
        ngpu = faiss.get_num_gpus() if use_gpu in ("auto", True) else 0
        if use_gpu is True and ngpu == 0:
            raise RuntimeError("use_gpu=True but FAISS sees no GPU; install faiss-gpu (pip install 'negatron[gpu]')")
        gpu_ok = ngpu > 0 and "HNSW" not in used_factory  # FAISS has no GPU HNSW
        index = faiss.index_cpu_to_all_gpus(cpu_index, _cloner_options(faiss), ngpu=ngpu) if gpu_ok else cpu_index
        prep = _normalized if metric == "cosine" else (lambda x: np.ascontiguousarray(x, dtype=np.float32))

        if not cpu_index.is_trained:
            nlist = _nlist(cpu_index) or 1
            n_train = min(store.count, train_sample or max(256 * nlist, 100_000))
            rng = np.random.default_rng(seed)
            rows = np.sort(rng.choice(store.count, size=n_train, replace=False))
            sample = prep(_gather(store, rows))
            logger.info("training %s on %d vectors", used_factory, n_train)
            index.train(sample)
        for _, emb in store.iter_shards():
            for start in range(0, len(emb), 65_536):
                index.add(prep(emb[start:start + 65_536]))
        if gpu_ok:
            cpu_index = faiss.index_gpu_to_cpu(index)
        build_seconds = time.perf_counter() - started

        nlist = _nlist(cpu_index)
        manifest = {
            "format_version": FORMAT_VERSION,
            "faiss_version": faiss.__version__,
            "model": store.manifest.get("model"),
            "checkpoint_hash": store.manifest.get("checkpoint_hash"),
            "dim": store.dim,
            "count": store.count,
            "factory": used_factory,
            "requested_factory": factory,
            "metric": metric,
            "nprobe": (nprobe or min(nlist, DEFAULT_NPROBE)) if nlist else None,
            "ef_search": (ef_search or DEFAULT_EF_SEARCH) if "HNSW" in used_factory else None,
            "build_seconds": round(build_seconds, 3),
            "gpus_used_for_build": ngpu if gpu_ok else 0,
            "embeddings": str(Path(store.folder).resolve()),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        output_dir = Path(output_dir)
        with atomic_dir(output_dir) as tmp:
            faiss.write_index(cpu_index, str(tmp / INDEX_FILE))
            manifest["index_bytes"] = (tmp / INDEX_FILE).stat().st_size
            (tmp / IDS_FILE).write_text("".join(f"{i}\n" for i in store.ids), encoding="utf-8")
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        return cls(_to_gpus(cpu_index, use_gpu), list(store.ids), manifest, output_dir)

    # ------------------------------------------------------------------ load
    @classmethod
    def load(cls, folder: str | os.PathLike, expect_dim: int | None = None, expect_model=None,
             use_gpu: bool | str = "auto") -> "DenseIndex":
        """Open a saved index, refusing a truncated/corrupt one or one that does not match expectations."""
        import faiss

        folder = Path(folder)
        fix = _REBUILD.format(dir=folder)
        manifest_path = folder / MANIFEST
        if not manifest_path.is_file():
            raise CorruptIndexError(manifest_path, None, "not a negatron index (no manifest.json)", fix)
        try:
            manifest = json.loads(manifest_path.read_text())
            dim, count = int(manifest["dim"]), int(manifest["count"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise CorruptIndexError(manifest_path, None, f"corrupt manifest ({exc})", fix) from None
        if expect_dim is not None and int(expect_dim) != dim:
            raise CorruptIndexError(manifest_path, None, f"index holds {dim}-d vectors but the model produces {expect_dim}-d",
                              f"use the model the index was built with ({manifest.get('model')!r}) or re-encode and rebuild")
        if expect_model is not None and not _model_matches(expect_model, manifest):
            shown = getattr(expect_model, "name", expect_model)
            raise CorruptIndexError(manifest_path, None,
                              f"index was built from model {manifest.get('model')!r} (checkpoint {manifest.get('checkpoint_hash')}), "
                              f"not {shown!r}",
                              "search with the model that encoded the corpus, or re-encode the corpus with this model and rebuild")
        index_path = folder / INDEX_FILE
        if not index_path.is_file():
            raise CorruptIndexError(index_path, None, "index file is missing", fix)
        size = index_path.stat().st_size
        if manifest.get("index_bytes") is not None and size != int(manifest["index_bytes"]):
            raise CorruptIndexError(index_path, None, f"file is {size} bytes, the manifest says {manifest['index_bytes']} (truncated or replaced)", fix)
        try:
            index = faiss.read_index(str(index_path))
        except RuntimeError as exc:
            raise CorruptIndexError(index_path, None, f"FAISS cannot read the index ({str(exc).strip().splitlines()[-1]})", fix) from None
        if index.d != dim or index.ntotal != count:
            raise CorruptIndexError(index_path, None, f"index has {index.ntotal} x {index.d}-d vectors, manifest says {count} x {dim}-d", fix)
        ids = read_ids(folder / IDS_FILE, count)
        return cls(_to_gpus(index, use_gpu), ids, manifest, folder)

    # ------------------------------------------------------------------ search
    def set_search_params(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """IVF lists probed and HNSW search breadth (speed/recall trade-off)."""
        import faiss

        if nprobe:
            self.manifest["nprobe"] = int(nprobe)
            try:
                faiss.GpuParameterSpace().set_index_parameter(self.index, "nprobe", int(nprobe)) if self._on_gpu else \
                    faiss.ParameterSpace().set_index_parameter(self.index, "nprobe", int(nprobe))
            except (RuntimeError, AttributeError):
                faiss.extract_index_ivf(self.index).nprobe = int(nprobe)
        if ef_search:
            self.manifest["ef_search"] = int(ef_search)
            faiss.ParameterSpace().set_index_parameter(self.index, "efSearch", int(ef_search))

    @property
    def _on_gpu(self) -> bool:
        return "Gpu" in type(self.index).__name__ or "Shards" in type(self.index).__name__

    def search(self, query_embeddings: np.ndarray, k: int, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (scores float32 ``[n, k]``, rows int64 ``[n, k]``), best first; row -1 pads when k > count."""
        q = np.atleast_2d(np.asarray(query_embeddings, dtype=np.float32))
        if q.shape[1] != self.dim:
            raise ValueError(f"queries are {q.shape[1]}-d but the index holds {self.dim}-d vectors "
                             f"(built from {self.manifest.get('model')!r})")
        if self.manifest.get("metric") == "cosine":
            q = _normalized(q)
        ef = self.manifest.get("ef_search")
        if ef and ef < k:  # HNSW cannot return more than efSearch candidates
            import faiss

            faiss.ParameterSpace().set_index_parameter(self.index, "efSearch", int(k))
        scores = np.empty((len(q), k), dtype=np.float32)
        rows = np.empty((len(q), k), dtype=np.int64)
        for start in range(0, len(q), batch_size):
            s, r = self.index.search(np.ascontiguousarray(q[start:start + batch_size]), k)
            scores[start:start + len(s)], rows[start:start + len(r)] = s, r
        if ef and ef < k:
            self.set_search_params(ef_search=ef)
        return scores, rows

    def search_ids(self, query_embeddings: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """Like :meth:`search` but ``(doc id, score)`` lists."""
        scores, rows = self.search(query_embeddings, k)
        return [[(self.ids[r], float(s)) for s, r in zip(srow, rrow) if r >= 0] for srow, rrow in zip(scores, rows)]

    def __repr__(self) -> str:
        m = self.manifest
        return f"DenseIndex(count={self.count}, dim={self.dim}, factory={m.get('factory')!r}, metric={m.get('metric')!r}, model={m.get('model')!r})"


def _gather(store: EmbeddingStore, rows: np.ndarray) -> np.ndarray:
    out = np.empty((len(rows), store.dim), dtype=np.float32)
    done = 0
    for (start, stop), (_, emb) in zip(store.shard_ranges(), store.iter_shards()):
        pick = rows[(rows >= start) & (rows < stop)] - start
        out[done:done + len(pick)] = emb[pick]
        done += len(pick)
    return out


def _cloner_options(faiss):
    co = faiss.GpuMultipleClonerOptions()
    co.shard = True  # split the vectors across GPUs: memory scales with the number of GPUs
    co.useFloat16 = True
    return co


def _to_gpus(index, use_gpu):
    """Every GPU FAISS sees, sharded, float16 storage; the CPU index when there are none (or for HNSW)."""
    import faiss

    if use_gpu not in ("auto", True) or not hasattr(faiss, "get_num_gpus") or faiss.get_num_gpus() == 0:
        return index
    if _hnsw(index) is not None:
        return index
    return faiss.index_cpu_to_all_gpus(index, _cloner_options(faiss))
