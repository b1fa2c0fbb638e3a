"""Where a merge's heavy work runs when its device is a GPU: there while the GPU's free memory holds what the work
needs, on the CPU otherwise, so that `device = cuda` never ends in an out-of-memory error.

Each heavy step asks its `DeviceBudget` for a device with an estimate of the memory it needs (`place`), or hands it
the work itself (`run`), which also catches an out-of-memory error on the GPU and repeats the work on the CPU. The
granularity is the step's own: a blended tensor, the whole weight matching (which first gives up keeping both
models on the GPU before giving up the GPU), activation matching, REPAIR. CPU and GPU run the same code,
parameterised by the device; only the place changes, never the method.

The first fallback of each step is announced once, as a progress event of stage `NOTICE_STAGE`; later ones of the
same step are counted (`fallbacks`), not repeated. Nothing about the device goes into the output's metadata: a merge
that fell back writes the bytes a CPU merge writes.

The estimates are upper bounds of what the step allocates at once (fp32 working copies, cost matrices,
correlation sums), not measurements; the out-of-memory catch is what makes an estimate that is too low harmless.

Tests drive the decisions without a GPU: `override_budget` makes every merge in its scope use a budget built by the
test (e.g. one whose `free_bytes` reports a small GPU on a CPU stand-in device), so the notices are exercised and
the results must equal a plain CPU merge's.
"""

from __future__ import annotations

import math
import sys
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch

from .archspec import ArchSpec, Group
from .progress import Reporter

R = TypeVar("R")
Notify = Callable[[str], None]

NOTICE_STAGE = "device"
CPU = torch.device("cpu")
# Memory that must stay free beyond a step's estimate: the CUDA context's own allocations, the caching allocator's
# rounding and fragmentation, and whatever the host (a WebUI's model) allocates meanwhile.
HEADROOM_BYTES = 256 * 2**20
HEADROOM_FACTOR = 1.2
_FP32 = 4


def format_size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


class DeviceBudget:
    """The device a merge was asked to compute on, and how much of its memory is free.

    A CPU device is unlimited (nothing is decided, nothing announced) unless `free_bytes` is given: that is the
    stand-in tests use. `fallback` is where work goes that does not fit (the CPU)."""

    def __init__(self, device: str | torch.device, notify: Notify | None = None,
                 free_bytes: Callable[[], int] | None = None, fallback: torch.device = CPU) -> None:
        self.device = torch.device(device)
        self.notify = notify
        self._free = free_bytes
        self.fallback = fallback
        self.fallbacks: dict[str, int] = {}

    @property
    def limited(self) -> bool:
        """Whether placements are decided at all (a GPU, or a stand-in with a simulated free memory)."""
        return self._free is not None or self.device.type == "cuda"

    def free_bytes(self) -> int:
        if self._free is not None:
            return self._free()
        if self.device.type == "cuda":
            return int(torch.cuda.mem_get_info(self.device)[0])
        return sys.maxsize

    def fits(self, need: int) -> bool:
        if not self.limited:
            return True
        want = int(need * HEADROOM_FACTOR) + HEADROOM_BYTES
        if want <= self.free_bytes():
            return True
        # Blocks the caching allocator holds for us count as used in mem_get_info: hand them back and ask again.
        _release_cached(self.device)
        return want <= self.free_bytes()

    def place(self, step: str, need: int) -> torch.device:
        """The device for a piece of `step` that needs about `need` bytes at once."""
        if self.fits(need):
            return self.device
        self._fell_back(step, f"needs about {format_size(need)}, {format_size(self.free_bytes())} free")
        return self.fallback

    def run(self, step: str, need: int, work: Callable[[torch.device], R]) -> R:
        """`work(device)` on the placed device; after an out-of-memory error there, `work(fallback)`."""
        device = self.place(step, need)
        if device == self.fallback and self.fallback != self.device:
            return work(device)
        try:
            return work(device)
        except torch.OutOfMemoryError:
            if not self.limited:
                raise
        # Outside the except block: the error's traceback holds the failed attempt's tensors until it is cleared.
        _release_cached(self.device)
        self._fell_back(step, "ran out of memory")
        return work(self.fallback)

    def _fell_back(self, step: str, why: str) -> None:
        count = self.fallbacks.get(step, 0)
        self.fallbacks[step] = count + 1
        if count == 0 and self.notify is not None:
            self.notify(f"{step} {why} on {self.device}: computed on the {self.fallback.type.upper()} "
                        "(slower, same result); later fallbacks of this step are not announced")


def _release_cached(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


_override: Callable[[torch.device, Notify | None], DeviceBudget] | None = None
_budgets: weakref.WeakKeyDictionary[Reporter, DeviceBudget] = weakref.WeakKeyDictionary()


def budget_for(device: str | torch.device, report: Reporter | None = None) -> DeviceBudget:
    """The budget of the merge `report` reports for (one per merge, so each step announces its fallback once),
    its notices sent as progress events; inside `override_budget`, the test's."""
    dev = torch.device(device)
    if report is not None:
        known = _budgets.get(report)
        if known is not None and known.device == dev:
            return known
    notify = None if report is None else _notifier(report)
    budget = _override(dev, notify) if _override is not None else DeviceBudget(dev, notify)
    if report is not None:
        _budgets[report] = budget
    return budget


def _notifier(report: Reporter) -> Notify:
    def notify(message: str) -> None:
        report(NOTICE_STAGE, 0.0, message)

    return notify


@contextmanager
def override_budget(factory: Callable[[torch.device, Notify | None], DeviceBudget]) -> Iterator[None]:
    """Every `budget_for` in this scope returns `factory(device, notify)` (tests: a simulated small GPU)."""
    global _override
    before, _override = _override, factory
    try:
        yield
    finally:
        _override = before


# --- what each step needs at once ------------------------------------------------------------------------------

def matching_keep(device: torch.device, ref_is_file: bool, fits_on_device: bool) -> tuple[bool, bool]:
    """Whether weight matching keeps the tensors it fetched, for the reference and B (see
    `align/match_tensors.py`). On the CPU a checkpoint file is re-read on each visit rather than held (both
    models' size in memory), while a running merge is computed, so it is kept. On a GPU everything is kept there
    if it fits, else everything is re-read."""
    if device.type == "cpu":
        return (not ref_is_file, False)
    return (True, True) if fits_on_device else (False, False)


def blend_need(shape: Iterable[int], terms: int) -> int:
    """One blended tensor: each term's fp32 copy and its permuted copy, and the fp32 result."""
    return (2 * terms + 1) * max(1, math.prod(shape)) * _FP32


def matching_need(spec: ArchSpec, groups: Iterable[Group]) -> tuple[int, int]:
    """Weight matching: (both models' matched tensors kept on the device plus the largest visit, the largest visit
    alone). A visit holds its group's cost matrix and error bound, and for one slot at a time the fetched tensors of
    A and B with fp32 copies of their windows (B's re-indexed once more)."""
    keys: set[str] = set()
    visit = 0
    for g in groups:
        largest = 0
        for s in g.slots:
            keys.add(s.key)
            largest = max(largest, math.prod(spec.shapes[s.key]))
        visit = max(visit, (2 * g.size * g.size + 5 * largest) * _FP32)
    kept = 2 * sum(math.prod(spec.shapes[k]) for k in keys) * _FP32
    return kept + visit, visit


def forward_need(spec: ArchSpec, latent_size: int, heads: int = 8) -> int:
    """A forward pass of both models layer by layer (REPAIR; activation matching's passes): the largest layer's fp32
    weights of both models, and one micro-batch's attention scores at the largest resolution (two of them:
    softmax's copy)."""
    layer = max((math.prod(shape) for shape in spec.shapes.values()), default=0) * _FP32 * 2
    tokens = latent_size * latent_size
    return layer + 2 * 2 * heads * tokens * tokens * _FP32


def activations_need(spec: ArchSpec, groups: Iterable[Group], latent_size: int) -> int:
    """Activation matching: the forward passes and every group's correlation sums (a unit-by-unit matrix per
    site)."""
    sums = sum((s.length * s.length + 4 * s.length) * _FP32 for g in groups for s in g.slots)
    return sums + forward_need(spec, latent_size)
