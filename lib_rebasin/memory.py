"""Giving a finished job's memory back to the system, so a long-running host returns to its size before the job.

A merge frees every tensor it made, but the C allocator keeps freed heap memory for reuse: a recipe holds a whole
intermediate model as hundreds of tensors next to short-lived read buffers, and once all are freed the heap is
fragmented and stays mapped, so the WebUI would stay a model's size larger after each recipe. glibc can be asked
to return free heap pages explicitly (`malloc_trim`); other C libraries either return them by themselves or have
no such call, and then this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys
from collections.abc import Callable

_trim: Callable[[int], int] | None = None
_looked_up = False


def _malloc_trim() -> Callable[[int], int] | None:
    global _trim, _looked_up
    if not _looked_up:
        _looked_up = True
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                fn = libc.malloc_trim  # glibc only (musl has none): AttributeError below
                fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
                _trim = fn
            except (OSError, AttributeError):
                _trim = None
    return _trim


def release_memory() -> bool:
    """Collect garbage (frames of a failed job can hold tensors in cycles), then return the allocator's free
    pages to the system. True when the allocator was asked to trim."""
    gc.collect()
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
