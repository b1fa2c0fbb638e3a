"""Progress reporting and cancellation for one merge (or one step of a recipe).

A job shows ONE bar: every stage and every nested step (an iteration of re-basin, a step of a recipe) reports
its own 0..1 progress into its share of the bar, so the job's fraction only ever goes forward, and each message
names the steps it is inside ("step 2/3: ..."). The ETA is the whole job's, from the time since it started and
the fraction done, so it cannot jump when a stage or a step starts."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from .arguments import check_arguments
from .errors import Cancelled


@dataclass
class ProgressEvent:
    fraction: float          # 0..1 for the whole merge
    stage: str               # "loading" | "matching" | "repair" | "hashing" | "writing"
    message: str
    eta_s: float | None = None


ProgressCallback = Callable[[ProgressEvent], None]
CancelCheck = Callable[[], bool]

# Below this fraction the job's rate is not yet known (headers read, nothing computed): no ETA.
ETA_FROM = 0.03


class Reporter:
    """Maps stage-local progress onto one overall fraction that never decreases, and checks the cancel flag.

    `stage(lo, hi)` sets the share of the bar the following reports fill; `part(lo, hi, name)` narrows the
    current share to its [lo, hi] for a nested step, naming the step in every message reported inside it."""

    def __init__(self, progress: ProgressCallback | None, cancel: CancelCheck | None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        check_arguments("Reporter", progress=progress, cancel=cancel)
        self.progress = progress
        self.cancel = cancel
        self.clock = clock
        self.started = clock()
        self.span = (0.0, 1.0)
        self.prefix = ""
        self.reached = 0.0  # the highest fraction reported: a report never moves the bar back
        # Set once the output is being put in place (`merge_checkpoints`'s commit): the merge has then succeeded,
        # and no later check may raise Cancelled for a file that exists.
        self.committed = False

    def stage(self, lo: float, hi: float) -> None:
        self.span = (lo, hi)

    @contextmanager
    def part(self, lo: float, hi: float, name: str = "") -> Iterator[Reporter]:
        outer, prefix = self.span, self.prefix
        a, b = outer
        self.span = (a + (b - a) * lo, a + (b - a) * hi)
        self.prefix = f"{prefix}{name}: " if name else prefix
        try:
            yield self
        finally:
            self.span, self.prefix = outer, prefix

    def relay(self, lo: float, hi: float, name: str = "") -> ProgressCallback:
        """A progress callback for a sub-job that reports its own whole 0..1 (a recipe's step): its events fill
        [lo, hi] of this reporter's current share, named `name`."""
        def forward(ev: ProgressEvent) -> None:
            with self.part(lo, hi, name):
                self(ev.stage, ev.fraction, ev.message)

        return forward

    def check(self) -> None:
        if self.cancel is not None and not self.committed and self.cancel():
            raise Cancelled()

    def eta(self, fraction: float) -> float | None:
        if fraction < ETA_FROM:
            return None
        elapsed = self.clock() - self.started
        return max(0.0, elapsed * (1 - fraction) / fraction)

    def __call__(self, stage: str, local: float, message: str) -> None:
        self.check()
        if self.progress is None:
            return
        lo, hi = self.span
        fraction = max(self.reached, lo + (hi - lo) * min(max(local, 0.0), 1.0))
        self.reached = fraction
        self.progress(ProgressEvent(fraction, stage, self.prefix + message, self.eta(fraction)))
