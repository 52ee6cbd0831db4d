"""A FAISS index over an :class:`~index.store.EmbeddingStore`, saved with its ids and a manifest.

Folder layout: ``index.faiss`` (CPU form), ``ids.txt`` (row -> doc id), ``manifest.json``; readers cache the
ids' line ends beside them (``ids.txt.ends.npy``, see :meth:`retriever.offset_index.CorpusIds.from_lines`).

IVF sizing: FAISS wants at least 39 training points per centroid. When the corpus is too small for
the requested ``nlist`` we clamp ``nlist`` to ``count // 39`` and log a warning (the factory actually
used is recorded in the manifest), rather than fail: a small corpus with a big-corpus recipe should
still index, and the manifest tells the truth about what was built.

IVF/PQ training sample: ``train_sample`` vectors (default ``max(64 * nlist, 100_000)``, capped at
``MAX_DEFAULT_TRAIN_SAMPLE`` = 2M and at the corpus size), gathered from the float16 shards row by row
and converted to float32 once: IVF16384 at 8.8M x 768 trains on 1.05M vectors (3.2 GB float32), not on
``256 * nlist`` = all 8.8M (27 GB). Pass ``train_sample`` to trade memory for centroid quality.

GPUs: a single process builds on every GPU FAISS sees (sharded, float16) and keeps that GPU index for
search; only the CPU copy needed to write ``index.faiss`` is made, never a second GPU copy. Under
torchrun, rank 0 alone builds and writes the folder while the other ranks wait at a barrier and then
load it, each onto its own GPU (``LOCAL_RANK``) rather than every rank onto every GPU. GPU FAISS returns
at most ``GPU_MAX_K`` = 2,048 hits per query; :meth:`DenseIndex.search` says so instead of crashing.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

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
MAX_DEFAULT_TRAIN_SAMPLE = 2_000_000
GPU_MAX_K = 2048  # faiss/gpu/utils/DeviceDefs.cuh: GPU_MAX_SELECTION_K
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


def _normalized(x: np.ndarray, inplace: bool = False) -> np.ndarray:
    if not (inplace and x.dtype == np.float32 and x.flags.c_contiguous and x.flags.writeable):
        x = np.array(x, dtype=np.float32, copy=True, order="C")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x /= np.maximum(norms, 1e-12)
    return x


def default_train_sample(nlist: int, count: int) -> int:
    """Training vectors for ``nlist`` IVF lists: 64 a list (FAISS warns below 39), at least 100k, at most 2M."""
    return min(count, max(64 * nlist, 100_000), MAX_DEFAULT_TRAIN_SAMPLE)


def _dist_rank_world() -> tuple[int, int]:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except ImportError:
        pass
    return 0, 1


def _barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


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

    def __init__(self, index, ids: Sequence[str], manifest: dict, folder: Path | None = None):
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
              nprobe: int | None = None, ef_search: int | None = None, seed: int = 0,
              distributed: bool = True) -> "DenseIndex":
        """Build from an embeddings folder and save to ``output_dir`` atomically.

        ``metric="cosine"`` L2-normalises documents (and, at search time, queries) and uses inner product.
        ``train_sample``: vectors used to train IVF/PQ (default :func:`default_train_sample`).
        Under torchrun (an initialised process group) rank 0 builds and writes; the other ranks wait at a
        barrier, then load the folder (each onto its own GPU). Every rank must call this, unless
        ``distributed=False``: this process alone builds (a mining service on the main rank, whose other
        ranks never reach the barrier).
        """
        rank, world = _dist_rank_world() if distributed else (0, 1)
        if world > 1:
            if rank == 0:
                try:
                    built = cls._build(store_or_dir, output_dir, factory, metric, train_sample, use_gpu, nprobe,
                                       ef_search, seed, keep_gpu=False)
                finally:
                    _barrier()  # release the others even on failure: they then fail to load, not hang
                return cls(_to_gpus(built.index, use_gpu), built.ids, built.manifest, built.folder)
            _barrier()
            return cls.load(output_dir, use_gpu=use_gpu)
        return cls._build(store_or_dir, output_dir, factory, metric, train_sample, use_gpu, nprobe, ef_search, seed)

    @classmethod
    def _build(cls, store_or_dir, output_dir, factory, metric, train_sample, use_gpu, nprobe, ef_search, seed,
               keep_gpu: bool = True) -> "DenseIndex":
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
        _skip_polysemous_training(cpu_index)
        ngpu = _num_gpus(faiss) if use_gpu in ("auto", True) else 0
        if use_gpu is True and ngpu == 0:
            raise RuntimeError("use_gpu=True but FAISS sees no GPU; install the GPU build of FAISS "
                               "(pip uninstall -y faiss-cpu && pip install faiss-gpu-cu12, see the README)")
        gpu_ok = ngpu > 0 and "HNSW" not in used_factory  # FAISS has no GPU HNSW
        index = faiss.index_cpu_to_all_gpus(cpu_index, _cloner_options(faiss), ngpu=ngpu) if gpu_ok else cpu_index

        n_train = None
        if not cpu_index.is_trained:
            nlist = _nlist(cpu_index) or 1
            n_train = min(store.count, int(train_sample)) if train_sample else default_train_sample(nlist, store.count)
            rng = np.random.default_rng(seed)
            rows = np.sort(rng.choice(store.count, size=n_train, replace=False))
            sample = _gather(store, rows)  # float32, one copy
            if metric == "cosine":
                _normalized(sample, inplace=True)
            logger.info("training %s on %d of %d vectors (%.0f MB float32)", used_factory, n_train, store.count,
                        sample.nbytes / 2**20)
            index.train(sample)
            del sample
        if not gpu_ok and isinstance(cpu_index, faiss.IndexFlatCodes):
            _fill_flat_codes(cpu_index, store, metric)
        elif not gpu_ok and isinstance(cpu_index, faiss.IndexIVF):
            _fill_ivf_lists(cpu_index, store, metric)
        else:
            for chunk in _float32_chunks(store, metric):
                index.add(chunk)
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
            "train_sample": n_train,
            "embeddings": str(Path(store.folder).resolve()),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        output_dir = Path(output_dir)
        with atomic_dir(output_dir) as tmp:
            # FAISS writes CPU indexes only: a GPU-built one is copied back for the file, then dropped
            to_write = faiss.index_gpu_to_cpu(index) if gpu_ok else cpu_index
            faiss.write_index(to_write, str(tmp / INDEX_FILE))
            del to_write
            manifest["index_bytes"] = (tmp / INDEX_FILE).stat().st_size
            shutil.copyfile(Path(store.folder) / "ids.txt", tmp / IDS_FILE)  # same rows: copy, never a list of ids
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if gpu_ok and keep_gpu:
            return cls(index, read_ids(output_dir / IDS_FILE, store.count), manifest, output_dir)  # no second GPU copy
        if gpu_ok:
            del index
            cpu_index = faiss.read_index(str(output_dir / INDEX_FILE))  # the GPU copy is freed; the caller places it
        return cls(cpu_index if not keep_gpu else _to_gpus(cpu_index, use_gpu), read_ids(output_dir / IDS_FILE, store.count),
                   manifest, output_dir)

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
    def max_k(self) -> int | None:
        """Most hits one search returns: 2,048 on a GPU index, unbounded (None) on the CPU."""
        return GPU_MAX_K if self._on_gpu else None

    @property
    def _on_gpu(self) -> bool:
        return "Gpu" in type(self.index).__name__ or "Shards" in type(self.index).__name__

    def search(self, query_embeddings: np.ndarray, k: int, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (scores float32 ``[n, k]``, rows int64 ``[n, k]``), best first; row -1 pads when k > count."""
        q = np.atleast_2d(np.asarray(query_embeddings, dtype=np.float32))
        if self.max_k is not None and k > self.max_k:
            raise ValueError(f"k={k} is more than a GPU FAISS index returns ({self.max_k}); ask for k <= {self.max_k} "
                             "or load the index on the CPU (use_gpu=False)")
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


ADD_CHUNK_ROWS = 65_536  # rows converted to float32 at a time, never a whole shard


def _float32_chunks(store: EmbeddingStore, metric: str):
    for emb in _raw_shards(store):
        for start in range(0, len(emb), ADD_CHUNK_ROWS):
            chunk = np.ascontiguousarray(emb[start:start + ADD_CHUNK_ROWS], dtype=np.float32)
            yield _normalized(chunk, inplace=True) if metric == "cosine" else chunk


def _fill_flat_codes(index, store: EmbeddingStore, metric: str) -> None:
    """Flat, SQ and PQ (``IndexFlatCodes``) hold one code array. ``index.add`` grows it chunk by chunk, and
    each growth past capacity copies it (old + new array resident: ~1.6x the final size at 8.8M x Flat);
    sizing it once and encoding each chunk into place (``sa_encode``, the codes ``add`` would write) peaks
    at the final size."""
    import faiss

    size = index.code_size
    index.codes.resize(store.count * size)
    codes = faiss.rev_swig_ptr(index.codes.data(), store.count * size)  # a numpy view of the index's codes
    row = 0
    for chunk in _float32_chunks(store, metric):
        codes[row * size:(row + len(chunk)) * size] = index.sa_encode(chunk).ravel()
        row += len(chunk)
    index.ntotal = store.count


def _skip_polysemous_training(index) -> None:
    """FAISS's factory turns on polysemous training for PQ (a code reordering by annealing, ~20 s for PQ4
    on this CPU and growing with the sub-quantizers) that only a Hamming-threshold search
    (``polysemous_ht``) uses; negatron never searches that way, so the training would be pure waste.
    The codes' distances, and so every search result, are the same without it."""
    import faiss

    if isinstance(index, faiss.IndexPreTransform):  # e.g. OPQ16,PQ16
        index = faiss.downcast_index(index.index)
    ivf = faiss.try_extract_index_ivf(index)
    inner = faiss.downcast_index(ivf) if ivf is not None else index
    if getattr(inner, "do_polysemous_training", False):
        inner.do_polysemous_training = False


def _fill_ivf_lists(index, store: EmbeddingStore, metric: str) -> None:
    """IVF adds append to one vector per list, and each append past capacity reallocates it; the freed
    blocks fragment the heap (measured at 8.8M x IVF16384,SQfp16: ~1.5x the lists' final size resident).
    Assigning every vector first, reserving each list at its final size, then adding with those
    assignments (``add_core``, FAISS's own add path) gives the same index byte for byte at ~1x, for the
    cost of one int64 per vector while it builds."""
    import faiss

    lists = faiss.downcast_InvertedLists(index.invlists)
    if not isinstance(lists, faiss.ArrayInvertedLists) or index.ntotal:
        for chunk in _float32_chunks(store, metric):
            index.add(chunk)
        return
    assign = np.empty(store.count, dtype=np.int64)
    row = 0
    for chunk in _float32_chunks(store, metric):
        assign[row:row + len(chunk)] = index.quantizer.assign(chunk, 1).ravel()
        row += len(chunk)
    for list_no, size in enumerate(np.bincount(assign, minlength=index.nlist).tolist()):
        lists.resize(list_no, size)  # allocate the final size once...
        lists.resize(list_no, 0)  # ...and keep it as capacity: std::vector never shrinks on resize
    row = 0
    for chunk in _float32_chunks(store, metric):
        ids = np.arange(row, row + len(chunk), dtype=np.int64)
        where = assign[row:row + len(chunk)]
        index.add_core(len(chunk), faiss.swig_ptr(chunk), faiss.swig_ptr(ids), faiss.swig_ptr(where))
        row += len(chunk)


def _raw_shards(store: EmbeddingStore):
    """Each shard as stored (float16 memmap): callers convert the rows they need, not whole shards."""
    return store.raw_shards()


def _gather(store: EmbeddingStore, rows: np.ndarray) -> np.ndarray:
    """Rows (sorted) of the store as one float32 array, read shard by shard from the float16 memmaps."""
    out = np.empty((len(rows), store.dim), dtype=np.float32)
    done = 0
    for (start, stop), emb in zip(store.shard_ranges(), _raw_shards(store)):
        pick = rows[(rows >= start) & (rows < stop)] - start
        out[done:done + len(pick)] = emb[pick]
        done += len(pick)
    return out


def _num_gpus(faiss) -> int:
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def _cloner_options(faiss):
    co = faiss.GpuMultipleClonerOptions()
    co.shard = True  # split the vectors across GPUs: memory scales with the number of GPUs
    co.useFloat16 = True
    return co


def _to_gpus(index, use_gpu):
    """Every GPU FAISS sees, sharded, float16 storage; the CPU index when there are none (or for HNSW).

    Under torchrun each rank takes only its own GPU (``LOCAL_RANK``): eight ranks each sharding over all
    eight GPUs would put eight copies on every GPU.
    """
    import faiss

    if use_gpu not in ("auto", True) or _num_gpus(faiss) == 0:
        return index
    if _hnsw(index) is not None:
        return index
    _, world = _dist_rank_world()
    if world > 1:
        co = faiss.GpuClonerOptions()
        co.useFloat16 = True
        device = int(os.environ.get("LOCAL_RANK", "0")) % _num_gpus(faiss)
        return faiss.index_cpu_to_gpu(_gpu_resources(device), device, index, co)
    return faiss.index_cpu_to_all_gpus(index, _cloner_options(faiss))


_GPU_RESOURCES: dict[int, object] = {}


def _gpu_resources(device: int):
    import faiss

    if device not in _GPU_RESOURCES:  # one StandardGpuResources per device per process (it owns scratch memory)
        _GPU_RESOURCES[device] = faiss.StandardGpuResources()
    return _GPU_RESOURCES[device]
