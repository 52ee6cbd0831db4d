"""Returning freed memory to the operating system."""

from __future__ import annotations

import ctypes
import gc
import functools


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None


def release_freed_memory(collect: bool = True) -> None:
    """Collect garbage (``collect``) and hand freed heap back to the OS (glibc ``malloc_trim``).

    glibc keeps freed arenas mapped, so a transient peak (a tokenizer's working memory, a model
    conversion) would otherwise stay in the resident size and stack on every later peak of the job."""
    if collect:
        gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def release_mapped_pages(*arrays) -> None:
    """Unmap the resident pages of memory-mapped numpy arrays (``madvise(MADV_DONTNEED)``); the file's page
    cache stays and a later read maps its pages again.

    Linux maps file pages in 2 MiB folios at the first touch of a region, so a burst of scattered reads (a
    qrels file's 503k id lookups, 64 spot checks of an id map) leaves almost the whole file counted in the
    process's RSS: ~0.5 GB of 8.8M-passage id maps in STAR and ADORE. Called after such a burst; arrays that
    are not memory-mapped are skipped."""
    import mmap

    for arr in arrays:
        while arr is not None and not hasattr(arr, "_mmap"):
            arr = getattr(arr, "base", None)  # a view of a memmap: its base holds the mapping
        handle = getattr(arr, "_mmap", None) if arr is not None else None
        if handle is None or not hasattr(handle, "madvise"):
            continue
        try:
            handle.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):  # a closed map, or a platform without it: nothing held
            pass


def file_mappings(path) -> list[tuple[int, int]]:
    """``(start, length)`` of this process's read-only memory mappings of ``path`` now (Linux
    ``/proc/self/maps``; empty elsewhere). For maps made by a library (FAISS's memory-mapped index) that
    numpy cannot see."""
    import os

    target = os.path.realpath(path)
    out = []
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                parts = line.split(None, 5)
                if len(parts) == 6 and "w" not in parts[1] and parts[5].rstrip("\n") == target:
                    start, end = (int(v, 16) for v in parts[0].split("-"))
                    out.append((start, end - start))
    except OSError:
        pass
    return out


@functools.lru_cache(maxsize=1)
def _madvise():
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return fn


def release_file_pages(path) -> None:
    """:func:`release_mapped_pages` for every read-only map of the file ``path`` (a map made by a library):
    its pages stay in the page cache and map again when read. The maps are looked up at each call (~1-3 ms),
    never remembered, so an address range unmapped and reused since is never touched."""
    import mmap

    fn = _madvise()
    if fn is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    for start, length in file_mappings(path):
        fn(start, length, mmap.MADV_DONTNEED)
