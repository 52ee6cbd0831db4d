"""Corpus embeddings on disk: row-range shards of ``.npy`` (memory-mappable) plus ids and a manifest.

Layout of an embeddings folder::

    manifest.json        model, checkpoint hash, dim, count, dtype, normalize, shard plan, created
    ids.txt              one document id per line, row order (= corpus order)
    ids.txt.ends.npy     the lines' end offsets, written by the first reader (a cache: deleting it is safe)
    shard-00000.npy ...  rows [i*shard_size, (i+1)*shard_size), float16 or float32

Each shard is written atomically, so a killed run leaves only whole shards and a rerun skips them.
``manifest.json`` says ``"complete": true`` once every shard exists.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from retriever.data import DataError

MANIFEST = "manifest.json"
IDS = "ids.txt"
FORMAT_VERSION = 1


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.npy"


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        raise DataError(path, None, "no embeddings manifest", "encode the corpus first with `negatron encode --model M --corpus DATA --output DIR`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(path, exc.lineno, f"corrupt manifest ({exc.msg})", "delete the folder and re-run `negatron encode`") from None


def read_ids(path: Path, expected: int):
    """The folder's ids as a read-only sequence over the memory-mapped ``ids.txt`` (8 bytes an id for the
    newline positions; a Python list of MS MARCO's 8.8M ids would take ~0.5 GB in every process)."""
    from retriever.offset_index import CorpusIds

    if not path.is_file():
        raise DataError(path, None, "ids file is missing", "delete the folder and rebuild it")
    ids = CorpusIds.from_lines(path)
    if len(ids) != expected:
        raise DataError(path, None, f"{len(ids)} ids but the manifest says {expected}", "the folder is corrupt or truncated; delete it and rebuild")
    return ids


class EmbeddingStore:
    """Read access to an embeddings folder written by :func:`index.encode.encode_corpus`."""

    def __init__(self, folder: Path, manifest: dict, ids: Sequence[str]):
        self.folder = folder
        self.manifest = manifest
        self.ids = ids

    @classmethod
    def open(cls, folder: str | os.PathLike) -> "EmbeddingStore":
        folder = Path(folder)
        manifest = read_manifest(folder)
        if not manifest.get("complete"):
            missing = [shard_name(i) for i in range(manifest.get("num_shards", 0)) if not (folder / shard_name(i)).exists()]
            raise DataError(folder / MANIFEST, None, f"encoding is unfinished ({len(missing)} shards missing, e.g. {missing[:2]})",
                            "re-run the same `negatron encode` command; it resumes where it stopped")
        store = cls(folder, manifest, read_ids(folder / IDS, int(manifest["count"])))
        for i, (start, stop) in enumerate(store.shard_ranges()):
            store._shard(i, start, stop)  # checks each shard's header: shape and dtype
        return store

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def count(self) -> int:
        return int(self.manifest["count"])

    @property
    def model(self) -> str:
        return str(self.manifest.get("model"))

    @property
    def checkpoint_hash(self) -> str:
        return str(self.manifest.get("checkpoint_hash"))

    def shard_ranges(self) -> list[tuple[int, int]]:
        size = int(self.manifest["shard_size"])
        return [(s, min(s + size, self.count)) for s in range(0, self.count, size)]

    def _shard(self, i: int, start: int, stop: int) -> np.ndarray:
        path = self.folder / shard_name(i)
        try:
            arr = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise DataError(path, None, f"unreadable embeddings shard ({exc})", "delete this shard file and re-run `negatron encode` to redo it") from None
        want = (stop - start, self.dim)
        if arr.shape != want or arr.dtype != np.dtype(self.manifest["dtype"]):
            raise DataError(path, None, f"shard has shape {arr.shape} {arr.dtype}, expected {want} {self.manifest['dtype']}",
                            "delete this shard file and re-run `negatron encode` to redo it")
        return arr

    def iter_shards(self) -> Iterator[tuple[list[str], np.ndarray]]:
        """``(ids, float32 embeddings)`` per shard; float32 shards are zero-copy memmap views."""
        for i, (start, stop) in enumerate(self.shard_ranges()):
            arr = self._shard(i, start, stop)
            yield self.ids[start:stop], arr if arr.dtype == np.float32 else arr.astype(np.float32)

    def raw_shards(self) -> Iterator[np.ndarray]:
        """Each shard as stored (a float16/float32 read-only memmap): convert only the rows you need."""
        for i, (start, stop) in enumerate(self.shard_ranges()):
            yield self._shard(i, start, stop)

    def gather(self, rows, dtype=np.float32) -> np.ndarray:
        """Embeddings of ``rows`` (any order, repeats allowed) read from the memmapped shards: what ADORE needs
        for its negatives, without ``load_all()`` (27 GB float32 at 8.8M x 768)."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.count):
            raise IndexError(f"rows must lie in [0, {self.count})")
        out = np.empty((len(rows), self.dim), dtype=dtype)
        size = int(self.manifest["shard_size"])
        shard_of = rows // size
        for s in np.unique(shard_of).tolist():
            start, stop = s * size, min((s + 1) * size, self.count)
            pick = np.flatnonzero(shard_of == s)
            out[pick] = self._shard(s, start, stop)[rows[pick] - start]
        return out

    def load_all(self) -> np.ndarray:
        out = np.empty((self.count, self.dim), dtype=np.float32)
        for (start, stop), (_, emb) in zip(self.shard_ranges(), self.iter_shards()):
            out[start:stop] = emb
        return out

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return f"EmbeddingStore({str(self.folder)!r}, count={self.count}, dim={self.dim}, model={self.model!r})"
