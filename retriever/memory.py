"""Returning freed memory to the operating system."""

from __future__ import annotations

import gc


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap back to the OS (glibc ``malloc_trim``).

    glibc keeps freed arenas mapped, so a transient peak (a tokenizer's working memory, a model
    conversion) would otherwise stay in the resident size and stack on every later peak of the job."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass
