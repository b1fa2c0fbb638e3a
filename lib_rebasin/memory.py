"""Giving a finished job's memory back to the system, so a long-running host returns to its size before the job;
and, while a merge runs, reusing the memory it frees instead of asking the system for fresh pages.

A merge frees every tensor it made, but the C allocator keeps freed heap memory for reuse: a recipe holds a whole
intermediate model as hundreds of tensors next to short-lived read buffers, and once all are freed the heap is
fragmented and stays mapped, so the WebUI would stay a model's size larger after each recipe. glibc can be asked
to return free heap pages explicitly (`malloc_trim`); other C libraries either return them by themselves or have
no such call, and then this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")

_trim: Callable[[int], int] | None = None
_mallopt: Callable[[int, int], int] | None = None
_looked_up = False


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library, on Linux; None elsewhere or where it cannot be loaded."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def _malloc_trim() -> Callable[[int], int] | None:
    global _trim, _mallopt, _looked_up
    if not _looked_up:
        _looked_up = True
        libc = _libc()
        if libc is not None:
            try:
                fn = libc.malloc_trim  # glibc only (musl has none): AttributeError below
                fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
                opt = libc.mallopt
                opt.argtypes, opt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
                _trim, _mallopt = fn, opt
            except AttributeError:
                _trim = _mallopt = None
    return _trim


def release_memory() -> bool:
    """Collect garbage (frames of a failed job can hold tensors in cycles), then return the allocator's free
    pages to the system. True when the allocator was asked to trim."""
    gc.collect()
    return trim_free_pages()


def trim_free_pages() -> bool:
    """Return the heap's free pages to the system now (glibc's `malloc_trim`), thresholds unchanged: for a job
    inside `reused_heap()` whose freed memory would otherwise stay resident between its steps. True when the
    allocator was asked to trim."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


@functools.cache
def _mallinfo2() -> Callable[[], _MallInfo2] | None:
    """glibc's `mallinfo2` (2.33 and later); None elsewhere."""
    libc = _libc()
    if libc is None or _malloc_trim() is None:
        return None
    try:
        fn = libc.mallinfo2
    except AttributeError:  # glibc before 2.33
        return None
    fn.argtypes, fn.restype = [], _MallInfo2
    return fn


def _resident_idle_bytes() -> int | None:
    """The process's resident anonymous memory that the C allocator has not handed out (its heaps' free pages that
    are still resident, plus whatever else is anonymous: thread stacks, Python's own arenas): `RssAnon` less
    glibc's bytes in use (`mallinfo2`). None where either is not available."""
    mallinfo2 = _mallinfo2()
    if mallinfo2 is None:
        return None
    try:
        with open("/proc/self/status", "rb") as f:
            anon = next(int(line.split()[1]) << 10 for line in f if line.startswith(b"RssAnon:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    info = mallinfo2()
    return anon - info.uordblks - info.hblkhd


# How much the resident free heap may grow while a merge visits group after group before it is returned.
IDLE_GROWTH_LIMIT = 512 << 20


def idle_heap_trimmer(limit: int = IDLE_GROWTH_LIMIT) -> Callable[[], None]:
    """A check for a step that allocates and frees buffers of many sizes in turn (weight matching: call it after
    each visit): it returns the heap's free pages (`trim_free_pages`) once the resident memory the allocator is not
    using has grown by more than `limit` since the check was made. Such a step normally reuses its freed blocks; in
    some runs the order of its allocations left them too small for the next buffers, and the heap grew by each
    buffer, all of it resident. Measured against the start, so a host's own memory never counts. Does nothing
    where the memory in use cannot be read."""
    start = _resident_idle_bytes()
    if start is None:
        return lambda: None

    def check() -> None:
        idle = _resident_idle_bytes()
        if idle is not None and idle - start > limit:
            trim_free_pages()

    return check


# glibc's mallopt parameters, and its initial thresholds, which a merge restores (fixed from then on: glibc lets
# them rise on its own only until a program sets them). Keeping larger ones after a merge left freed memory that a
# returning host counts as its own.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_INITIAL_MMAP, _INITIAL_TRIM = 128 << 10, 128 << 10
# During a merge: blocks up to this size come from the heap, and freed heap memory is kept for reuse.
_MERGE_MMAP, _MERGE_TRIM = 1 << 30, (1 << 31) - 1
_depth = 0
_merge_thresholds = False  # reused_heap() set the merge's thresholds (and restores glibc's initial ones after)


def _user_tuned() -> bool:
    """The process was started with its own malloc settings: those are kept."""
    return any(k.startswith("MALLOC_") for k in os.environ) or "malloc" in os.environ.get("GLIBC_TUNABLES", "")


@contextmanager
def reused_heap() -> Iterator[None]:
    """Within the block, freed memory is reused instead of returned to the system and asked for again.

    A merge makes and frees a few buffers per tensor, most of them larger than glibc's threshold for mapping
    blocks of their own; each such block is fresh pages from the system, faulted in and zeroed one page at a time,
    which costs more than the arithmetic done on it. Raising the thresholds keeps those blocks in the heap, where
    the next tensor's buffer reuses them. Afterwards the thresholds go back to glibc's initial ones and the free heap is
    returned to the system (`malloc_trim`). Nothing changes where the C library is not glibc, or where the
    process was started with its own malloc settings."""
    global _depth, _merge_thresholds
    trim = _malloc_trim()
    if _mallopt is None or trim is None or _user_tuned() or _depth:
        _depth += 1
        try:
            yield
        finally:
            _depth -= 1
        return
    _depth += 1
    _mallopt(_M_MMAP_THRESHOLD, _MERGE_MMAP)
    _mallopt(_M_TRIM_THRESHOLD, _MERGE_TRIM)
    _merge_thresholds = True
    try:
        yield
    finally:
        _depth -= 1
        _merge_thresholds = False
        _mallopt(_M_MMAP_THRESHOLD, _INITIAL_MMAP)
        _mallopt(_M_TRIM_THRESHOLD, _INITIAL_TRIM)
        trim(0)


_own_depth = 0  # nesting of `own_mappings()` blocks that set glibc's initial mmap threshold


@contextmanager
def own_mappings() -> Iterator[None]:
    """Within the block, inside a merge's `reused_heap()`, glibc's initial mmap threshold again: blocks over
    128 KiB allocated in it are mapped on their own, outside the heap, and given back when freed (the heap's free
    top is still kept: the merge's trim threshold stays); the merge's threshold comes back after the outermost
    block. For a step that keeps memory allocated for long between large short-lived buffers (activation
    matching: its correlation sums, written batch by batch between both models' layer outputs): in the reused heap
    each buffer freed below the long-lived memory stays resident, and the holes added up to gigabytes at full-size
    SDXL. Outside a merge's thresholds (no merge, not glibc, or the process's own malloc settings) nothing
    changes."""
    global _own_depth
    if not _merge_thresholds or _mallopt is None:
        yield
        return
    _own_depth += 1
    _mallopt(_M_MMAP_THRESHOLD, _INITIAL_MMAP)
    try:
        yield
    finally:
        _own_depth -= 1
        if not _own_depth:
            _mallopt(_M_MMAP_THRESHOLD, _MERGE_MMAP)


@contextmanager
def heap_blocks() -> Iterator[None]:
    """Within an `own_mappings()` block, the merge's thresholds again for the block: for buffers that are freed
    as soon as they are used and made again at every step (a forward pass reading and widening each layer's
    weights), which then reuse the heap's pages instead of each being a fresh mapping faulted in page by page.
    Nothing long-lived may be allocated in it (it would pin the heap's holes). Elsewhere nothing changes."""
    if not _own_depth or _mallopt is None:
        yield
        return
    _mallopt(_M_MMAP_THRESHOLD, _MERGE_MMAP)
    try:
        yield
    finally:
        if _own_depth:
            _mallopt(_M_MMAP_THRESHOLD, _INITIAL_MMAP)


def with_reused_heap(fn: Callable[P, R]) -> Callable[P, R]:
    """`fn` run inside `reused_heap()`."""
    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with reused_heap():
            return fn(*args, **kwargs)

    return wrapper
