"""What a merge is asked to do: the methods and the options, validated before any file is opened."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .checkpoint import PRECISIONS
from .blocks import check_values
from .errors import RebasinError
from .methods import ALL_PARAMS, METHODS, MethodInfo, Param  # noqa: F401  (re-exported)
from .spec import PARTS


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
    # Block weights: 26 weights of B (BASE, IN00..IN11, M00, OUT00..OUT11, see blocks.py); None = alpha everywhere.
    blocks: tuple[float, ...] | None = None
    blocks_preset: str | None = None          # the preset name the 26 values came from (recorded, not used)
    # Re-basin B (and C, with B's permutation) onto A before the method runs; method "rebasin" always does.
    align: bool = False
    # Method parameters (methods.py declares which method uses which, with ranges; defaults are the same there).
    ties_density: float = 0.2
    ties_scale: float = 1.0
    dare_p: float = 0.9

    @property
    def aligned(self) -> bool:
        return self.method == "rebasin" or self.align

    def method_params(self) -> dict[str, Any]:
        """This method's parameters by name (what its per-key function receives)."""
        return {p.name: getattr(self, p.name) for p in METHODS[self.method].params}

    def alpha_of(self, key: str) -> float:
        """The weight of B for `key`: its block's weight with block weights, else alpha."""
        if self.blocks is None:
            return self.alpha
        from .blocks import BlockWeights

        return BlockWeights(self.blocks).alpha_of(key, self.alpha)

    def validate(self) -> None:
        if self.method not in METHODS:
            raise RebasinError(f"Unknown method '{self.method}'; choose one of {', '.join(METHODS)}.")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha)):
            raise RebasinError("alpha must be a number.")
        info = METHODS[self.method]
        if not 0.0 <= self.alpha <= 1.0 and info.alpha_bounded:
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
        for param in info.params:
            problem = param.check(getattr(self, param.name), info.label)
            if problem:
                raise RebasinError(problem)
        if self.blocks is not None:
            if self.method == "legacy":
                raise RebasinError("Legacy mode reproduces a tool that had no block weights; use weighted_sum or "
                                   "rebasin with block weights.")
            check_values(tuple(self.blocks), info.alpha_bounded)
        if self.align and self.method == "legacy":
            raise RebasinError("Legacy mode cannot be combined with re-basin alignment.")
        if self.align and self.iterations != 1 and self.method != "rebasin":
            raise RebasinError(f"iterations apply to the rebasin method only; {info.label} with alignment "
                               "matches once (use iterations = 1).")

