"""Progress reporting and cancellation for one merge (or one step of a recipe)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from .arguments import check_arguments
from .errors import Cancelled


@dataclass
class ProgressEvent:
    fraction: float          # 0..1 for the whole merge
    stage: str               # "loading" | "matching" | "writing" | "hashing"
    message: str
    eta_s: float | None = None


ProgressCallback = Callable[[ProgressEvent], None]
CancelCheck = Callable[[], bool]


class Reporter:
    """Maps stage-local progress onto one overall fraction, and checks the cancel flag."""

    def __init__(self, progress: ProgressCallback | None, cancel: CancelCheck | None) -> None:
        check_arguments("Reporter", progress=progress, cancel=cancel)
        self.progress = progress
        self.cancel = cancel
        self.stage_start = time.perf_counter()
        self.span = (0.0, 1.0)
        # Set once the output is being put in place (`merge_checkpoints`'s commit): the merge has then succeeded,
        # and no later check may raise Cancelled for a file that exists.
        self.committed = False

    def stage(self, lo: float, hi: float) -> None:
        self.span = (lo, hi)
        self.stage_start = time.perf_counter()

    def check(self) -> None:
        if self.cancel is not None and not self.committed and self.cancel():
            raise Cancelled()

    def __call__(self, stage: str, local: float, message: str) -> None:
        self.check()
        if self.progress is None:
            return
        lo, hi = self.span
        elapsed = time.perf_counter() - self.stage_start
        eta = elapsed * (1 - local) / local if local > 0.02 else None
        self.progress(ProgressEvent(lo + (hi - lo) * min(max(local, 0.0), 1.0), stage, message, eta))

