"""The torch settings a merge's heavy loops run under, whatever the host process set, restored afterwards.

Activation matching and REPAIR run thousands of small operations (a 16x16 latent through every layer). With
OpenMP, each one ends in a barrier where the team's threads spin until all arrive: when the team has as many
threads as the machine has CPUs and anything else wants a CPU (the WebUI's own threads, a browser, another
process), one thread is descheduled and the others burn their time slices waiting for it. The same merge then
takes many times longer, depending on the machine's load and on the thread settings of whichever process runs
it (a WebUI, the CLI). Leaving one CPU free keeps the team's threads on CPUs of their own; the host's own limit
(`torch.set_num_threads`, OMP_NUM_THREADS) is kept as an upper bound.

The count depends only on the CPUs the process may use and that limit, never on the momentary load: the number
of threads changes how sums are split, so a load-dependent count would give the same merge different bytes.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

import torch

P = ParamSpec("P")
R = TypeVar("R")


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))  # a container's or taskset's limit, where the OS has one
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def merge_threads() -> int:
    """Intra-op threads for a merge: one CPU left to everything else, never more than the host allows."""
    return max(1, min(torch.get_num_threads(), usable_cpus() - 1))


@contextmanager
def merge_compute() -> Iterator[None]:
    """Run the enclosed work with `merge_threads()` threads and without autograd; the host's thread count is
    restored afterwards (it is process-wide: the host's next generation must not inherit ours)."""
    before = torch.get_num_threads()
    threads = merge_threads()
    if threads != before:
        torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def with_merge_compute(fn: Callable[P, R]) -> Callable[P, R]:
    """`fn` run inside `merge_compute()` (nested calls keep the outer settings)."""
    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with merge_compute():
            return fn(*args, **kwargs)

    return wrapper
