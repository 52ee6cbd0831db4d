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
