"""The on-disk offset index of a corpus file: one shared, memory-mapped copy per corpus.

A :class:`~retriever.data.Corpus` needs, per document, the byte offset of its line (row -> text) and
its id (row -> id, id -> row). Held as a Python list + dict this costs ~1.2 GB at MS MARCO's 8.8M
passages and was rebuilt by every consumer (train data, STAR, ANCE, the mining service). Here it is
five numpy files, built once per corpus version and memory-mapped by every process that opens it:

    meta.json        corpus path, size, mtime, count, format version
    offsets.npy      int64 [N]   byte offset of each document's line
    id_bytes.npy     uint8 [B]   every id's UTF-8 bytes, concatenated in row order
    id_ends.npy      int64 [N]   end of id i in id_bytes (start = end of id i-1)
    id_hashes.npy    uint64 [N]  64-bit BLAKE2b of each id, sorted
    id_rows.npy      int64 [N]   the row of each sorted hash (id -> row is a binary search)

~41 bytes per document on disk (plus the id bytes), and only the pages a process touches are resident.
The folder lives under ``$NEGATRON_CACHE_DIR/corpus-index`` (default ``~/.cache/negatron``), keyed by
the corpus's resolved path, size and mtime, so an edited corpus gets a fresh index; it is written to a
temp folder and renamed into place, so concurrent builders (torchrun ranks) never see half an index.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from array import array
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_FILES = ("offsets", "id_bytes", "id_ends", "id_hashes", "id_rows")


def text_key(text: str) -> int:
    """Stable signed 64-bit BLAKE2b of a text (a query, or a stripped passage): the key of the compact maps.
    Two different texts collide with probability ~n²/2⁶⁵ (~10⁻⁸ for 503k MS MARCO queries)."""
    # surrogatepass: a lone surrogate (valid in JSON) hashes instead of failing; other texts are unchanged
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little",
                          signed=True)


def id_hash(doc_id: str) -> int:
    """Stable 64-bit hash of an id (Python's ``hash`` changes per process)."""
    return int.from_bytes(hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest(), "little")


def cache_root() -> Path:
    from retriever.quickstart_data import default_cache_dir

    return default_cache_dir() / "corpus-index"


def cache_key(path: Path) -> str:
    st = path.stat()
    raw = f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0v{FORMAT_VERSION}"
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


class CorpusIds(Sequence[str]):
    """Row -> id over the memory-mapped id bytes; behaves like the list of ids it replaces.

    ``sep`` is the separator width between ids: 0 for the packed ``id_bytes``, 1 for a newline-separated
    ``ids.txt`` mapped as is (``ends`` are then the newline positions).
    """

    def __init__(self, id_bytes: np.ndarray, id_ends: np.ndarray, sep: int = 0):
        self._bytes, self._ends, self._sep = id_bytes, id_ends, sep

    @classmethod
    def from_lines(cls, path: Path) -> "CorpusIds":
        """The ids of a one-id-a-line file (an embeddings or index folder's ``ids.txt``), memory-mapped. The
        line ends are found by one scan and kept beside the file (``<name>.ends.npy``, memory-mapped by later
        opens while it is newer than the file and agrees with its size): as an array in every process that
        opens the folder they were 67 MiB at 8.8M ids, twice in STAR and ADORE (the store and the index)."""
        path = Path(path)
        size = path.stat().st_size
        data = np.memmap(path, dtype=np.uint8, mode="r") if size else np.empty(0, np.uint8)
        ends = _cached_line_ends(path, size)
        if ends is None:
            ends = np.concatenate([np.flatnonzero(data[start:start + (1 << 26)] == 10) + start
                                   for start in range(0, size, 1 << 26)]) if size else np.empty(0, np.int64)
            if size and data[-1] != 10:  # no final newline: the last id ends at the end of the file
                ends = np.append(ends, size)
            ends = _cache_line_ends(path, ends.astype(np.int64))
        ids = cls(data, ends, sep=1)
        ids.release_pages()  # the scan touched every page; lookups map back only what they read
        return ids

    def __len__(self) -> int:
        return len(self._ends)

    def release_pages(self) -> None:
        """Unmap the pages a burst of reads left resident (:func:`retriever.memory.release_mapped_pages`)."""
        from retriever.memory import release_mapped_pages

        release_mapped_pages(self._bytes, self._ends)

    def _one(self, row: int) -> str:
        start = int(self._ends[row - 1]) + self._sep if row > 0 else 0
        return bytes(self._bytes[start:int(self._ends[row])]).decode("utf-8")

    def take(self, rows) -> list[str]:
        """The ids of many rows (one numpy gather, then a bytes slice each: ~10x fewer per-id costs)."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"rows outside 0..{len(self) - 1}")
        ends = self._ends[rows]
        starts = np.where(rows > 0, self._ends[np.maximum(rows - 1, 0)] + self._sep, 0)
        data = memoryview(self._bytes)
        return [bytes(data[a:b]).decode("utf-8") for a, b in zip(starts.tolist(), ends.tolist())]

    def __getitem__(self, key):  # type: ignore[override]
        if isinstance(key, slice):
            return [self._one(i) for i in range(*key.indices(len(self)))]
        row = int(key)
        if row < 0:
            row += len(self)
        if not 0 <= row < len(self):
            raise IndexError(f"row {key} out of range for {len(self)} ids")
        return self._one(row)

    def __iter__(self) -> Iterator[str]:
        for start in range(0, len(self), 65_536):  # decode a chunk at a time: no per-id numpy overhead
            stop = min(start + 65_536, len(self))
            base = int(self._ends[start - 1]) + self._sep if start > 0 else 0
            blob = bytes(self._bytes[base:int(self._ends[stop - 1])])
            prev = 0
            for end in (self._ends[start:stop] - base).tolist():
                yield blob[prev:end].decode("utf-8")
                prev = end + self._sep

    def __eq__(self, other) -> bool:
        if not isinstance(other, Sequence) or len(other) != len(self):
            return False
        return all(a == b for a, b in zip(self, other))

    def __ne__(self, other) -> bool:
        return not self == other

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        head = ", ".join(repr(i) for i in self[:3])
        return f"CorpusIds([{head}{', ...' if len(self) > 3 else ''}], n={len(self)})"


class PreadColumn:
    """Entries of a 1-D int64 array saved as ``.npy`` and memory-mapped, read with ``pread`` instead of
    through the map: Linux maps a file's pages in folios of up to 2 MiB at the first touch of a region, so
    scattered reads through a map (a batch's passages, a triple's line) leave most of an 8.8M-row offsets file
    (67 MiB; 320 MiB for 40M triples) counted in the process's RSS, where ``pread`` leaves it in the page
    cache. Arrays held in memory are indexed directly."""

    def __init__(self, array: np.ndarray):
        self.array = array
        mapped = (isinstance(array, np.memmap) and array.filename is not None and array.ndim == 1
                  and array.dtype == np.dtype("<i8") and array.flags.c_contiguous)
        self._path, self._base = (array.filename, int(array.offset)) if mapped else (None, 0)
        self._fd, self._pid = None, None

    def __len__(self) -> int:
        return len(self.array)

    def read(self, start: int, count: int = 1) -> np.ndarray:
        """``array[start:start + count]`` (clipped at the end, like a slice); ``start`` must be in range."""
        if not 0 <= start < len(self.array):
            raise IndexError(f"row {start} out of range for {len(self.array)} rows")
        count = min(count, len(self.array) - start)
        if self._path is None:
            return np.asarray(self.array[start:start + count])
        if self._fd is None or self._pid != os.getpid():  # a forked worker opens its own descriptor
            self._fd, self._pid = os.open(self._path, os.O_RDONLY), os.getpid()
        return np.frombuffer(os.pread(self._fd, 8 * count, self._base + 8 * start), dtype=np.int64)

    def __getstate__(self):
        return {"array": self.array}

    def __setstate__(self, state):
        self.__init__(state["array"])

    def __del__(self):
        if getattr(self, "_fd", None) is not None and self._pid == os.getpid():
            with contextlib.suppress(OSError):
                os.close(self._fd)


class OffsetIndex:
    """The five arrays of one corpus, memory-mapped (or in memory when the cache is not writable)."""

    def __init__(self, arrays: dict[str, np.ndarray], folder: Path | None):
        self.folder = folder
        self.offsets = arrays["offsets"]
        self._offset_reader = PreadColumn(self.offsets)
        self.ids = CorpusIds(arrays["id_bytes"], arrays["id_ends"])
        self._hashes, self._rows = arrays["id_hashes"], arrays["id_rows"]

    def __len__(self) -> int:
        return len(self.offsets)

    def offset(self, row: int) -> int:
        """Byte offset of ``row``'s line, read without touching the map (:class:`PreadColumn`)."""
        return int(self._offset_reader.read(row)[0])

    def release_pages(self, text_keys: np.ndarray | None = None) -> None:
        """Unmap the pages of the five arrays (and ``text_keys``) that a burst of lookups left resident."""
        from retriever.memory import release_mapped_pages

        self.ids.release_pages()
        release_mapped_pages(self.offsets, self._hashes, self._rows, text_keys)

    def row(self, doc_id: str) -> int | None:
        """The row of ``doc_id``, or None. Collisions (two ids, one hash) are resolved by comparing ids."""
        h = np.uint64(id_hash(doc_id))
        j = int(np.searchsorted(self._hashes, h, side="left"))
        while j < len(self._hashes) and self._hashes[j] == h:
            r = int(self._rows[j])
            if self.ids[r] == doc_id:
                return r
            j += 1
        return None

    def rows(self, doc_ids: Sequence[str]) -> np.ndarray:
        """Rows of many ids at once (int64, -1 for an unknown id): one vectorised hash search and one id
        gather to confirm the matches (a Python lookup per id was 45 % of STAR's mining time at 8.8M)."""
        ids = doc_ids if isinstance(doc_ids, list) else list(doc_ids)
        out = np.full(len(ids), -1, dtype=np.int64)
        if not ids or not len(self._hashes):
            return out
        h = np.fromiter((id_hash(d) for d in ids), dtype=np.uint64, count=len(ids))
        j = np.minimum(np.searchsorted(self._hashes, h, side="left"), len(self._hashes) - 1)
        hit = np.flatnonzero(np.asarray(self._hashes[j]) == h)
        found = np.asarray(self._rows[j[hit]], dtype=np.int64)
        for i, r, name in zip(hit.tolist(), found.tolist(), self.ids.take(found)):
            if name == ids[i]:
                out[i] = r
            else:  # another id with the same hash comes first: walk the run of equal hashes
                r = self.row(ids[i])
                out[i] = -1 if r is None else r
        return out

    def text_keys(self, texts: Callable[[], Iterator[str]]) -> np.ndarray:
        """int64 :func:`text_key` of every row's text, in row order: ``text_keys.npy`` in the cache folder,
        made from ``texts()`` (every row's stripped text) on first use and memory-mapped after that."""
        path = self.folder / "text_keys.npy" if self.folder is not None else None
        if path is not None and path.is_file():
            keys = np.load(path, mmap_mode="r")
            if len(keys) == len(self):
                return keys
        keys = np.fromiter((text_key(t) for t in texts()), dtype=np.int64, count=len(self))
        if path is None:
            return keys
        try:
            return _save_mapped(path, keys)
        except OSError as exc:  # read-only cache: keep them in memory
            logger.warning("cannot cache the text keys under %s (%s)", self.folder, exc)
            return keys

    # ------------------------------------------------------------------ open / build
    @classmethod
    def open(cls, folder: Path) -> "OffsetIndex":
        return cls({name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in _FILES}, folder)

    @classmethod
    def open_or_build(cls, path: Path, scan: Callable[[], Iterator[tuple[int, int, str]]],
                      on_duplicate: Callable[[int, int, str], None]) -> "OffsetIndex":
        """The cached index of ``path``, built by ``scan`` (yields ``(line number, byte offset, id)``) when absent.

        ``on_duplicate(first_row, second_row, id, offsets)`` is called (and must raise) for a repeated id.
        """
        folder = cache_root() / cache_key(path)
        if (folder / "meta.json").is_file():
            try:
                return cls.open(folder)
            except (OSError, ValueError) as exc:  # a damaged cache entry: rebuild it
                logger.warning("corpus index %s is unreadable (%s); rebuilding", folder, exc)
                shutil.rmtree(folder, ignore_errors=True)
        arrays = _build_arrays(scan, on_duplicate)
        meta = {"format_version": FORMAT_VERSION, "corpus": str(path.resolve()), "size": path.stat().st_size,
                "mtime_ns": path.stat().st_mtime_ns, "count": int(len(arrays["offsets"]))}
        try:
            _write_atomically(folder, arrays, meta)
        except OSError as exc:  # read-only cache: still works, just per process
            logger.warning("cannot cache the corpus index of %s under %s (%s); keeping it in memory", path, folder, exc)
            return cls(arrays, None)
        return cls.open(folder)


def _build_arrays(scan, on_duplicate) -> dict[str, np.ndarray]:
    # array('q') grows in place at 8 bytes an entry: no Python int or str object per document is kept
    offsets, ends, hashes = array("q"), array("q"), array("Q")
    blob = bytearray()
    for _lineno, offset, doc_id in scan():
        raw = doc_id.encode("utf-8")
        offsets.append(offset)
        blob += raw
        ends.append(len(blob))
        hashes.append(id_hash(doc_id))
    hashes_np = np.frombuffer(hashes, dtype=np.uint64) if len(hashes) else np.empty(0, np.uint64)
    order = np.argsort(hashes_np, kind="stable")  # stable: equal hashes keep file order (first seen first)
    sorted_hashes = hashes_np[order]
    arrays = {
        "offsets": np.frombuffer(offsets, dtype=np.int64).copy() if len(offsets) else np.empty(0, np.int64),
        "id_bytes": np.frombuffer(bytes(blob), dtype=np.uint8).copy(),
        "id_ends": np.frombuffer(ends, dtype=np.int64).copy() if len(ends) else np.empty(0, np.int64),
        "id_hashes": sorted_hashes,
        "id_rows": order.astype(np.int64),
    }
    same = np.flatnonzero(sorted_hashes[1:] == sorted_hashes[:-1])
    if len(same):
        ids = CorpusIds(arrays["id_bytes"], arrays["id_ends"])
        dups = []
        for j in same.tolist():  # equal hashes: a real duplicate, or (1 in ~10^10 at 8.8M) a collision
            run_start = j
            while run_start > 0 and sorted_hashes[run_start - 1] == sorted_hashes[j]:
                run_start -= 1
            second = int(order[j + 1])
            for k in range(run_start, j + 1):
                first = int(order[k])
                if ids[first] == ids[second]:
                    dups.append((second, first))
                    break
        if dups:
            second, first = min(dups)  # report the duplicate that comes first in the file
            on_duplicate(first, second, ids[second], arrays["offsets"])
    return arrays


def _write_atomically(folder: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        for name, arr in arrays.items():
            np.save(tmp / f"{name}.npy", arr)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")  # written last: marks a complete folder
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "meta.json").is_file():  # not "another process won the race"
                raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(tmp)


def _line_ends_path(path: Path) -> Path:
    return path.with_name(path.name + ".ends.npy")


def _cached_line_ends(path: Path, size: int) -> np.ndarray | None:
    """The saved line ends of ``path`` when they are newer than it and end where it ends, else None."""
    cached = _line_ends_path(path)
    try:
        if cached.stat().st_mtime_ns < path.stat().st_mtime_ns:
            return None
        ends = np.load(cached, mmap_mode="r")
    except (OSError, ValueError):
        return None
    if ends.dtype != np.int64 or ends.ndim != 1 or (size == 0) != (len(ends) == 0):
        return None
    if len(ends) and int(ends[-1]) not in (size, size - 1):
        return None
    return ends


def _cache_line_ends(path: Path, ends: np.ndarray) -> np.ndarray:
    """Save ``ends`` beside ``path`` (atomically) and return them memory-mapped; in memory when the folder is
    read-only."""
    try:
        return _save_mapped(_line_ends_path(path), ends)
    except OSError:
        return ends


def _save_mapped(path: Path, array: np.ndarray) -> np.ndarray:
    """Save ``array`` as ``path`` (.npy, atomically) and return it memory-mapped from there."""
    from retriever.io import atomic_write

    with atomic_write(path) as fh:
        np.save(fh, array)
    return np.load(path, mmap_mode="r")


def line_offsets(path: Path) -> np.ndarray:
    """Memory-mapped int64 byte offsets of a text file's non-blank lines, built once and cached.

    For files read by line number (MS MARCO's 40M-line ``triples.train.small.tsv``: 320 MB of offsets on
    disk, nothing per line in RAM). Newlines are found with numpy over 16 MiB chunks, not a Python loop.
    """
    folder = cache_root() / f"lines-{cache_key(path)}"
    if (folder / "meta.json").is_file():
        with contextlib.suppress(OSError, ValueError):
            return np.load(folder / "offsets.npy", mmap_mode="r")
    starts, ends = [], []
    pos = 0
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(1 << 24)
            if not chunk:
                break
            nl = np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == 10) + pos
            ends.append(nl)
            pos += len(chunk)
    newlines = np.concatenate(ends) if ends else np.empty(0, np.int64)
    if pos and (not len(newlines) or newlines[-1] != pos - 1):
        newlines = np.append(newlines, pos)  # last line without a trailing newline
    line_starts = np.concatenate([[0], newlines[:-1] + 1]).astype(np.int64) if len(newlines) else np.empty(0, np.int64)
    lengths = newlines - line_starts  # bytes before the newline
    keep = lengths > 0
    if keep.any():  # a line of only "\r" or spaces is blank too: check the (rare) short lines in Python
        with open(path, "rb") as fh:
            for j in np.flatnonzero(keep & (lengths <= 4)).tolist():
                fh.seek(int(line_starts[j]))
                if not fh.read(int(lengths[j])).strip():
                    keep[j] = False
    offsets = np.ascontiguousarray(line_starts[keep])
    try:
        _write_atomically(folder, {"offsets": offsets}, {"format_version": FORMAT_VERSION, "file": str(path.resolve()),
                                                        "lines": int(len(offsets))})
    except OSError as exc:
        logger.warning("cannot cache the line index of %s under %s (%s); keeping it in memory", path, folder, exc)
        return offsets
    return np.load(folder / "offsets.npy", mmap_mode="r")
