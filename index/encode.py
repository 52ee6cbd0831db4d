"""Fast inference-only encoding of corpora and queries.

``encode_corpus`` streams a corpus shard by shard (rows ``[i*shard_size, (i+1)*shard_size)``), and
within a shard tokenises once, sorts by token length (batches pad to their longest member, so sorting
nearly removes padding), runs ``torch.inference_mode`` with bf16 autocast where the hardware has bf16,
and writes each shard atomically. A killed run resumes: finished shards are skipped. Under torchrun,
rank ``r`` of ``w`` takes shards ``r, r+w, ...``; whichever rank writes the last shard completes the
manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np

from retriever.data import Corpus, DataError
from retriever.modeling import bf16_supported  # noqa: F401  (re-exported for callers of index.encode)
from retriever.io import atomic_write, write_text_atomic
from retriever.memory import release_freed_memory

from index.openvino_backend import BULK_TEXTS, ENV, resolve_backend
from index.store import FORMAT_VERSION, IDS, MANIFEST, EmbeddingStore, shard_name

logger = logging.getLogger(__name__)

# Keys that must match for a rerun to resume into an existing folder.
_PLAN_KEYS = ("checkpoint_hash", "count", "dim", "dtype", "shard_size", "normalize", "corpus_bytes")


def load_model(model, device: str | None = None):
    """A :class:`~retriever.modeling.BiEncoder` from an instance, a path or a model name.

    Loaded models go to this process's GPU when there is one (``LOCAL_RANK`` under torchrun)."""
    from retriever.modeling import BiEncoder

    if isinstance(model, BiEncoder):
        return model
    import torch

    bi = BiEncoder.from_pretrained(str(model))
    if device is None and torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return bi.to(device) if device else bi


def model_fingerprint(model, kind: str = "document") -> str:
    """A hash of the weights and settings that shape ``kind`` embeddings (16 hex digits).

    Two folders with the same fingerprint were encoded by the same checkpoint with the same pooling,
    normalisation, prefix and max length."""
    h = hashlib.blake2b(digest_size=8)
    prefix = model.query_prefix if kind == "query" else model.doc_prefix
    max_len = model.query_max_length if kind == "query" else model.doc_max_length
    h.update(json.dumps([model.pooling, model.normalize, prefix, max_len]).encode())
    hash_weights(h, model.tower(kind))
    return h.hexdigest()


def hash_weights(h, module) -> None:
    """Feed every tensor of ``module``'s state dict (name and raw bytes) into the hash ``h``."""
    import torch

    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        t = tensor.detach().contiguous().cpu()
        h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy().tobytes())


def _encode(model, texts: Sequence[str], kind: str, batch_size: int | None, bf16: bool, progress=None,
            backend: str | None = None) -> np.ndarray:
    """Float32 embeddings in input order (see :meth:`BiEncoder.encode`: tokenise once, sort by length)."""
    return model.encode(list(texts), kind=kind, batch_size=batch_size, bf16=bf16, progress=progress, backend=backend)


def encode_texts(model, texts: Sequence[str], kind: str = "query", batch_size: int | None = None,
                 bf16: bool | None = None, backend: str | None = None, progress=None) -> np.ndarray:
    """Float32 ``[len(texts), dim]`` embeddings of ``texts`` as queries or documents.

    ``progress`` is advanced by each batch encoded (``progress.update(n)``)."""
    if kind not in ("query", "document"):
        raise ValueError(f"kind must be 'query' or 'document', not {kind!r}")
    model = load_model(model)
    bf16 = bf16_supported(model.device) if bf16 is None else bf16
    return _encode(model, list(texts), kind, batch_size, bf16, progress=progress, backend=backend)


def _rank_world() -> tuple[int, int]:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except ImportError:
        pass
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def default_shard_size(count: int, world: int, cap: int = 100_000) -> int:
    """At most ``cap`` documents per shard, and at least ``world`` shards so that no rank idles (a
    5,183-document corpus on 2 ranks: 2 shards of 2,592, not 1 of 5,183)."""
    return max(1, min(cap, -(-count // max(1, world))))


def _open_corpus(corpus) -> Corpus:
    if isinstance(corpus, Corpus):
        return corpus
    from index.bm25 import resolve_corpus_path

    return Corpus(resolve_corpus_path(corpus))


def encode_or_resume(model, corpus, output_dir, **options) -> EmbeddingStore:
    """:func:`encode_corpus` into a working folder of the caller's own (an index refresh's): the shards an
    interrupted encode of the same model and corpus left there are kept, anything else there is replaced
    (never use it on a folder a user named: their embeddings are not overwritten silently)."""
    try:
        return encode_corpus(model, corpus, output_dir, **options)
    except DataError as exc:
        if Path(exc.path) != Path(output_dir) / MANIFEST:  # a bad corpus, not another run's folder: say so
            raise
        logger.info("%s holds other embeddings (%s); encoding anew", output_dir, exc.problem)
        return encode_corpus(model, corpus, output_dir, overwrite=True, **options)


def encode_corpus(model, corpus, output_dir, *, batch_size: int | None = None, bf16: bool | None = None,
                  shard_size: int | None = None, show_progress: bool = True, dtype: str = "float16",
                  overwrite: bool = False, distributed: bool = True, backend: str | None = None,
                  max_length: int | None = None) -> EmbeddingStore:
    """Encode every document (``title + " " + text``) of ``corpus`` into ``output_dir``.

    ``dtype`` is the on-disk precision (float16 halves disk and RAM; cosine to float32 > 0.9999).
    ``bf16=None`` uses bf16 autocast where the device supports it; ``bf16=False`` computes in fp32.
    Re-running with the same model and corpus resumes; a different model or corpus in an existing
    folder is an error unless ``overwrite=True``.
    ``shard_size=None`` takes the folder's shard size when resuming, else ``default_shard_size``: up to
    100,000 documents, and small enough that every torchrun rank gets a shard.
    ``distributed=False`` encodes everything in this process even under torchrun (a mining service's
    refresh thread: its rank must not wait in a barrier the other ranks never reach).
    ``backend`` is the inference backend (``auto``: OpenVINO on CPUs when installed, for bf16 and for a corpus of at least
    ``BULK_TEXTS`` texts in fp32 on a CPU without native bf16; see
    :func:`index.openvino_backend.resolve_backend`).
    ``max_length`` truncates documents at that many tokens instead of the model's own ``doc_max_length``: a
    training config's ``model.doc_max_length``, so that a strategy's ``negatives.options.index.embeddings``
    accepts the folder (the fingerprint includes the length). Only with a model given by name or path.
    """
    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be float16 or float32, not {dtype!r}")
    if shard_size is not None and shard_size < 1:
        raise ValueError("shard_size must be positive")
    if max_length is not None and (max_length < 1 or not isinstance(model, (str, os.PathLike))):
        raise ValueError("max_length must be positive and comes with a model name or path (a loaded model "
                         "keeps its own doc_max_length)")
    model = load_model(model)
    if max_length is not None:
        model.doc_max_length = max_length
    corpus = _open_corpus(corpus)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rank, world = _rank_world() if distributed else (0, 1)
    bf16 = bf16_supported(model.device) if bf16 is None else bf16
    count = len(corpus)
    manifest_path = out / MANIFEST
    if shard_size is None:
        resumed = json.loads(manifest_path.read_text()).get("shard_size") if manifest_path.exists() and not overwrite else None
        shard_size = int(resumed) if resumed else default_shard_size(count, world)
    plan = {
        "format_version": FORMAT_VERSION,
        "model": model.name or "unnamed",
        "checkpoint_hash": model_fingerprint(model, "document"),
        "kind": "document",
        "dim": model.dim,
        "count": count,
        "dtype": dtype,
        "normalize": bool(model.normalize),
        "pooling": model.pooling,
        "max_length": model.doc_max_length,
        "shard_size": int(shard_size),
        "num_shards": (count + shard_size - 1) // shard_size,
        "corpus": str(Path(corpus.path).resolve()),
        "corpus_bytes": Path(corpus.path).stat().st_size,
        "bf16": bool(bf16),
        "backend": resolve_backend(backend, model.device, bool(bf16), bulk=count >= BULK_TEXTS),
    }
    if manifest_path.exists() and not overwrite:
        old = json.loads(manifest_path.read_text())
        diff = [k for k in _PLAN_KEYS if old.get(k) != plan[k]]
        if diff:
            fix = "choose a new --output folder, or pass --overwrite to replace it"
            if "checkpoint_hash" in diff and old.get("max_length") != plan["max_length"]:
                diff.append("max_length")  # the fingerprint covers it; naming it says what to change
                fix = (f"the folder was encoded at {old.get('max_length')} tokens, this model truncates at "
                       f"{plan['max_length']}: encode with `--max-length {plan['max_length']}` (or set the config's "
                       f"model.doc_max_length to {old.get('max_length')}); or " + fix)
            raise DataError(manifest_path, None,
                            f"folder holds embeddings of a different run ({', '.join(f'{k}: {old.get(k)!r} vs {plan[k]!r}' for k in diff)})",
                            fix)
        created = old.get("created")
        if (backend or os.environ.get(ENV) or "auto") == "auto" and old.get("backend") in ("torch", "openvino"):
            plan["backend"] = old["backend"]  # a resumed folder's shards all come from one backend
    else:
        if overwrite:
            for stale in out.glob("shard-*.npy"):
                stale.unlink()
        created = None
    plan["created"] = created or datetime.now(timezone.utc).isoformat(timespec="seconds")
    if rank == 0 and not (manifest_path.exists() and not overwrite):
        write_text_atomic(out / IDS, "".join(f"{i}\n" for i in corpus.ids))
        write_text_atomic(manifest_path, json.dumps({**plan, "complete": False}, indent=2) + "\n")

    mine = [i for i in range(plan["num_shards"]) if i % world == rank]
    todo = [i for i in mine if not (out / shard_name(i)).exists()]
    if len(todo) < len(mine):
        logger.info("resuming: %d of %d shards already done in %s", len(mine) - len(todo), len(mine), out)
    from retriever.progress import ProgressDisplay

    # one display for the whole stage; its total is what this rank still has to encode, so it ends full
    total = sum(min(shard_size, count - i * shard_size) for i in todo)
    started = time.perf_counter()
    with ProgressDisplay(enabled=show_progress).stage(f"encode rank {rank}" if world > 1 else "encode", total) as progress:
        for i in todo:
            start, stop = i * shard_size, min((i + 1) * shard_size, count)
            texts = [doc.full_text for doc in corpus[start:stop]]
            # the manifest's backend for every shard, a small last one included
            emb = _encode(model, texts, "document", batch_size, bf16, progress, plan["backend"]).astype(dtype, copy=False)
            with atomic_write(out / shard_name(i)) as fh:
                np.save(fh, emb)
            del texts, emb
            release_freed_memory()  # hand the shard's freed heap back before the next one piles on it
    seconds = time.perf_counter() - started
    if todo:
        logger.info("encoded %d shards in %.1fs", len(todo), seconds)

    try:
        import torch.distributed as dist

        if world > 1 and dist.is_available() and dist.is_initialized():
            dist.barrier()
    except ImportError:
        pass
    if all((out / shard_name(i)).exists() for i in range(plan["num_shards"])):
        manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else plan
        if not manifest.get("complete"):
            manifest.update(complete=True, finished=datetime.now(timezone.utc).isoformat(timespec="seconds"))
            write_text_atomic(manifest_path, json.dumps(manifest, indent=2) + "\n")
        return EmbeddingStore.open(out)
    if world == 1:
        raise RuntimeError(f"{out}: shards are missing after encoding; re-run to resume")
    return None  # type: ignore[return-value]  # other ranks still running; the last one completes the folder
