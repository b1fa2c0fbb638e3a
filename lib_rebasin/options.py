"""What a merge is asked to do: the methods and the options, validated before any file is opened."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .checkpoint import PRECISIONS
from .errors import RebasinError
from .spec import PARTS


@dataclass(frozen=True)
class MethodInfo:
    name: str
    label: str
    needs_c: bool
    help: str


METHODS: dict[str, MethodInfo] = {m.name: m for m in (
    MethodInfo("rebasin", "Re-basin (weight matching)", False,
               "Align B to A with function-preserving permutations, then (1-alpha)*A + alpha*B."),
    MethodInfo("weighted_sum", "Weighted sum", False, "(1-alpha)*A + alpha*B, no alignment."),
    MethodInfo("add_difference", "Add difference", True, "A + alpha*(B - C), e.g. C = the base B was tuned from."),
    MethodInfo("legacy", "Legacy (DunkMash tool compatible)", False,
               "What T0b1maru's re-basin_merger computes: a weighted sum, plus its re-matching of three "
               "output GroupNorm vectors. Not a real re-basin; kept to reproduce old recipes."),
)}


@dataclass(frozen=True)
class MergeOptions:
    method: str = "rebasin"
    alpha: float = 0.5
    iterations: int = 1
    parts: tuple[str, ...] = PARTS
    device: str = "cpu"
    precision: str = "fp16"
    seed: int = 0
    max_sweeps: int = 100
    # Stop matching when a sweep gains < tolerance x the first sweep's gain; 0 is the paper's rule (until a sweep
    # improves nothing). Measured on full-size independent models: 1 % stops after 3 sweeps in 155 s with 99.8 %
    # of the converged objective gain; the paper's rule took 73 sweeps and 1,503 s (benchmarks/results.md).
    tolerance: float = 0.01

    def validate(self) -> None:
        if self.method not in METHODS:
            raise RebasinError(f"Unknown method '{self.method}'; choose one of {', '.join(METHODS)}.")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha)):
            raise RebasinError("alpha must be a number.")
        if not 0.0 <= self.alpha <= 1.0 and self.method != "add_difference":
            raise RebasinError(f"alpha must be between 0 and 1 for {self.method}, got {self.alpha}.")
        if not 1 <= int(self.iterations) <= 10_000:
            raise RebasinError(f"iterations must be between 1 and 10000, got {self.iterations}.")
        bad = [p for p in self.parts if p not in PARTS]
        if bad or not self.parts:
            raise RebasinError(f"parts must be a non-empty subset of {', '.join(PARTS)}; got {list(self.parts)}.")
        if self.precision not in PRECISIONS:
            raise RebasinError(f"precision must be one of {', '.join(PRECISIONS)}, got '{self.precision}'.")
        if self.max_sweeps < 1:
            raise RebasinError("max_sweeps must be at least 1.")
        if not 0.0 <= self.tolerance < 1.0:
            raise RebasinError(f"tolerance must be in [0, 1), got {self.tolerance}.")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise RebasinError("device 'cuda' was chosen but no CUDA GPU is available; use 'cpu'.")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise RebasinError(f"device must be 'cpu' or 'cuda', got '{self.device}'.")

