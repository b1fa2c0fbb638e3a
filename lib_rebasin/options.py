"""What a merge is asked to do: the methods and the options, validated before any file is opened."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any

import torch

from .blocks import check_values
from .arguments import is_finite_number, shown
from .checkpoint import PRECISIONS
from .errors import ArgumentError, FieldError
from .methods import ALL_PARAMS, METHODS, MethodInfo, Param  # noqa: F401  (re-exported)
from .spec import PARTS


@dataclass(frozen=True)
class MergeOptions:
    def __new__(cls, *args: Any, **kwargs: Any) -> MergeOptions:
        # Before the generated __init__, whose TypeError for a misspelt option would name no field we can fix.
        _check_construction(list(cls.__dataclass_fields__), args, kwargs)
        return super().__new__(cls)

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
    # How re-basin finds B's permutation: "weights" (weight matching) or "activations" (match units by the
    # correlation of their activations on `activation_samples` seeded prompts along A's own DDIM trajectory,
    # activation_inputs.py; the VAE, which has no forward pass here, is weight matched).
    matching: str = "weights"
    activation_samples: int = 4
    # REPAIR (repair.py): after blending, map the output channels of every UNet layer that writes into a residual
    # stream to the interpolation of A's and aligned B's activation statistics (mean, std) on the same
    # `activation_samples` seeded prompts, folded into those layers' weights and biases. Interpolating two models
    # shrinks their activations ("variance collapse"); this restores the parents' spread. Two-model methods only.
    repair: bool = False
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

    # Keep NaN/Inf weights of an input in the output instead of refusing the merge (matching then treats them as 0).
    allow_nonfinite: bool = False

    def validate(self) -> None:
        """Raise a FieldError naming the first option of the wrong type or out of range."""
        _check_type("method", self.method, str)
        if self.method not in METHODS:
            raise FieldError("method", f"Unknown method '{self.method}'; choose one of {', '.join(METHODS)}.")
        _check_type("alpha", self.alpha, float)
        if not is_finite_number(self.alpha):
            raise FieldError("alpha", f"alpha must be a finite number, got {shown(self.alpha)}.")
        info = METHODS[self.method]
        if not info.alpha_bounded:
            if abs(self.alpha) > MAX_DIFFERENCE_ALPHA:
                raise FieldError("alpha", f"alpha must be between -{MAX_DIFFERENCE_ALPHA:g} and "
                                          f"{MAX_DIFFERENCE_ALPHA:g} for {self.method}, got {self.alpha:g}.")
        elif not 0.0 <= self.alpha <= 1.0:
            raise FieldError("alpha", f"alpha must be between 0 and 1 for {self.method}, got {self.alpha:g}.")
        _check_type("iterations", self.iterations, int)
        if not 1 <= self.iterations <= 10_000:
            raise FieldError("iterations", f"iterations must be between 1 and 10000, got {shown(self.iterations)}.")
        if not isinstance(self.parts, (tuple, list)) or not all(isinstance(p, str) for p in self.parts):
            raise FieldError("parts", f"parts must be a list of part names ({', '.join(PARTS)}), got "
                                      f"{shown(self.parts)}.")
        bad = [p for p in self.parts if p not in PARTS]
        if bad or not self.parts:
            raise FieldError("parts", f"parts must be a non-empty subset of {', '.join(PARTS)}; got "
                                      f"{list(self.parts)}.")
        _check_type("precision", self.precision, str)
        if self.precision not in PRECISIONS:
            raise FieldError("precision", f"precision must be one of {', '.join(PRECISIONS)}, got "
                                          f"'{self.precision}'.")
        _check_type("seed", self.seed, int)
        if not 0 <= self.seed < 2**63:
            raise FieldError("seed", f"seed must be between 0 and 2**63 - 1, got {shown(self.seed)}.")
        _check_type("max_sweeps", self.max_sweeps, int)
        if not 1 <= self.max_sweeps <= 100_000:
            raise FieldError("max_sweeps", f"max_sweeps must be between 1 and 100000, got {shown(self.max_sweeps)}.")
        _check_type("tolerance", self.tolerance, float)
        if not 0.0 <= self.tolerance < 1.0:
            raise FieldError("tolerance", f"tolerance must be in [0, 1), got {shown(self.tolerance)}.")
        _check_type("allow_nonfinite", self.allow_nonfinite, bool)
        _check_type("device", self.device, str)
        if not re.fullmatch(r"cpu|cuda(:[0-9]{1,4})?", self.device):
            raise FieldError("device", f"device must be 'cpu', 'cuda' or 'cuda:N', got {shown(self.device)}.")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise FieldError("device", "device 'cuda' was chosen but no CUDA GPU is available; use 'cpu'.")
        if self.blocks_preset is not None:
            _check_type("blocks_preset", self.blocks_preset, str)
        _check_type("align", self.align, bool)
        _check_type("matching", self.matching, str)
        if self.matching not in MATCHINGS:
            raise FieldError("matching", f"matching must be one of {', '.join(MATCHINGS)}, got "
                                         f"'{shown(self.matching)}'.")
        _check_type("activation_samples", self.activation_samples, int)
        if not 1 <= self.activation_samples <= MAX_ACTIVATION_SAMPLES:
            raise FieldError("activation_samples", f"activation_samples must be between 1 and "
                                                   f"{MAX_ACTIVATION_SAMPLES}, got {self.activation_samples}.")
        _check_type("repair", self.repair, bool)
        if self.repair and self.method not in REPAIRABLE:
            raise FieldError("repair", f"REPAIR restores the statistics of an interpolation of two models; "
                                       f"{info.label} is not one (use it with {' or '.join(REPAIRABLE)}).")
        if self.repair and "unet" not in self.parts:
            raise FieldError("repair", "REPAIR corrects UNet layers; parts must include unet.")
        if self.matching != "weights" and not self.aligned:
            raise FieldError("matching", f"matching = {self.matching} chooses how re-basin aligns B; {info.label} "
                                         "does not align (use the rebasin method, or align = true).")
        for param in info.params:
            problem = param.check(getattr(self, param.name), info.label)
            if problem:
                raise FieldError(param.name, problem)
        if self.blocks is not None:
            if not isinstance(self.blocks, (tuple, list)):
                raise FieldError("blocks", f"blocks must be a list of 26 numbers (or None), got "
                                           f"{shown(self.blocks)}; parse_blocks() turns a preset name or text "
                                           "into them.")
            if self.method == "legacy":
                raise FieldError("blocks", "Legacy mode reproduces a tool that had no block weights; use "
                                           "weighted_sum or rebasin with block weights.")
            check_values(tuple(self.blocks), info.alpha_bounded)
            if any(abs(v) > MAX_DIFFERENCE_ALPHA for v in self.blocks):
                raise FieldError("blocks", f"Block weights must be between -{MAX_DIFFERENCE_ALPHA:g} and "
                                           f"{MAX_DIFFERENCE_ALPHA:g}, got {max(self.blocks, key=abs):g}.")
        if self.align and self.method == "legacy":
            raise FieldError("align", "Legacy mode cannot be combined with re-basin alignment.")
        if self.align and self.iterations != 1 and self.method != "rebasin":
            raise FieldError("iterations", f"iterations apply to the rebasin method only; {info.label} with "
                                           "alignment matches once (use iterations = 1).")


MATCHINGS = ("weights", "activations")
# The methods whose result is (1 - a) A + a B' per key, for which "the parents' interpolated statistics" is defined.
REPAIRABLE = ("weighted_sum", "rebasin")
# Each sample is one prompt denoised over 5 timesteps, 4 forward passes of a UNet per step (two models, with and
# without the prompt): 64 samples is already ~1,300 UNet passes.
MAX_ACTIVATION_SAMPLES = 64

# add_difference: A + alpha (B - C). Beyond |alpha| = 10 the difference outweighs the model by an order of
# magnitude: no recipe uses that, and it is where a typo (1e308 for 0.2) turns into overflow.
MAX_DIFFERENCE_ALPHA = 10.0

_TYPE_WORDS = {int: "a whole number", float: "a number", str: "a string", bool: "true or false"}


def _check_type(name: str, value: object, kind: type) -> None:
    """Exact types, as a recipe or an API request must give them: True is not 1, 2.5 and "3" are not 3."""
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise FieldError(name, f"{name} must be {_TYPE_WORDS[kind]}, got {shown(value)}.")


def _check_construction(fields: list[str], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Unknown, surplus or doubled options, as one line naming them (what the dataclass would raise TypeError for)."""
    for name in kwargs:
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f"; options: {', '.join(fields)}"
            raise ArgumentError(f"MergeOptions has no option '{name}'{hint}.")
    if len(args) > len(fields):
        raise ArgumentError(f"MergeOptions takes at most {len(fields)} options by position, got {len(args)}; "
                            "name them (MergeOptions(method=..., alpha=...)).")
    twice = [name for name in fields[:len(args)] if name in kwargs]
    if twice:
        raise ArgumentError(f"MergeOptions got {twice[0]} both by position and by name.")
