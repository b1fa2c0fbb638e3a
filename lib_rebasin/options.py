"""What a merge is asked to do: the option table, and `MergeOptions` made from it, validated before any file opens.

`OPTIONS` is the one declaration of every option (`option.Option`): the core's own below, then each method's
parameters gathered from `methods.METHODS`. `MergeOptions` is a frozen dataclass whose fields are the table's,
`validate` checks every value by its declaration (type, bounds, choices, the methods it applies to) and adds only
the rules that join two options. The CLI (cli.py), recipes (recipe/run.py), provenance (recipe/provenance.py), the HTTP
request (ui/request.py) and the tab are made from the same table; a new option is one entry here plus its use in
the merge.

One limit per option, everywhere: where the interfaces used to disagree, the core's value was kept (iterations up
to 10,000; max_sweeps and allow_nonfinite now reach the API as well).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from .errors import ArgumentError, FieldError
from .io.precisions import PRECISIONS
from .merge.block_weights import check_values
from .messages import shown
from .methods import ALL_PARAMS, METHODS, MethodInfo
from .option import Option
from .parts import PARTS

MATCHINGS = ("weights", "activations")
# Each sample is one prompt denoised over several timesteps, four UNet passes per step (two models, with and
# without the prompt): the cost grows fast, and a few dozen prompts already estimate activation statistics well.
MAX_ACTIVATION_SAMPLES = 64
# add_difference: A + alpha (B - C). Beyond |alpha| = 10 the difference outweighs the model by an order of
# magnitude: no recipe uses that, and it is where a typo (1e308 for 0.2) turns into overflow.
MAX_DIFFERENCE_ALPHA = 10.0


def _matches(m: MethodInfo) -> bool:
    """The merge may weight- or activation-match B to A: always (rebasin) or with `align`."""
    return m.aligns or m.alignable


CORE_OPTIONS: tuple[Option, ...] = (
    Option("method", str, "rebasin", "Merge method", "the merge method (see methods.py)", choices=tuple(METHODS),
           widget="dropdown", webui_name="interp_method"),
    # [0, 1] for an interpolation (alpha_bounded); wider where alpha is a factor on a difference.
    Option("alpha", float, 0.5, "Alpha (weight of B)", "weight of model B", low=-MAX_DIFFERENCE_ALPHA,
           high=MAX_DIFFERENCE_ALPHA, applies=lambda m: m.uses_alpha, widget="slider", step=0.01,
           webui_name="multiplier", method_bounds=lambda m: (0.0, 1.0) if m.alpha_bounded else
           (-MAX_DIFFERENCE_ALPHA, MAX_DIFFERENCE_ALPHA), sweep=True),
    Option("iterations", int, 1, "Iterations",
           "step alpha over N merges, re-aligning B to the running merge each step (legacy: the old tool's "
           "iterations)", low=1, high=10_000, applies=lambda m: m.iterates),
    Option("parts", tuple, PARTS, "Parts to merge",
           "the parts to merge: unet, te, vae (the others keep model A's weights)", choices=PARTS,
           widget="checkboxes"),
    Option("device", str, "cpu", "Device", "cpu, cuda or cuda:N: where cost matrices and methods are computed",
           widget="dropdown"),
    Option("precision", str, "fp16", "Precision", "output precision", choices=tuple(PRECISIONS), widget="radio"),
    Option("seed", int, 0, "Seed",
           "seed of the random group order in weight matching, of activation matching's and REPAIR's prompts and "
           "of random methods' drop masks", low=0, high=2**63 - 1, group="advanced"),
    Option("max_sweeps", int, 100, "Max sweeps", "upper bound on weight-matching sweeps", low=1, high=100_000,
           applies=_matches, group="advanced"),
    # 0 is the paper's rule (stop when a sweep improves nothing); a small fraction keeps nearly all of the gain
    # for far fewer sweeps on independently trained models (benchmarks/ has the measurements).
    Option("tolerance", float, 0.01, "Matching tolerance",
           "stop weight matching once a sweep gains less than this fraction of the first sweep's gain (0 = only "
           "when a sweep improves nothing, as in the paper, which takes far longer for the last bit of the gain)",
           low=0.0, high=1.0, high_open=True, applies=_matches, widget="slider", step=0.001, group="advanced"),
    Option("allow_nonfinite", bool, False, "Allow NaN/Inf weights",
           "keep NaN/Inf weights of an input in the output instead of refusing the merge (matching treats them "
           "as 0)", widget="checkbox", group="advanced", recorded_when=lambda o: o.allow_nonfinite),
    Option("align", bool, False, "Re-basin align B (and C) to A first",
           "re-basin B (and C, with B's permutation) onto A before the method (implied by rebasin)",
           applies=lambda m: m.alignable, inapplicable="refuse",
           refusal="{label} cannot be combined with re-basin alignment.", widget="checkbox",
           recorded_when=lambda o: o.align),
    Option("matching", str, "weights", "Matching",
           "how re-basin finds B's permutation: weights (weight matching) or activations (pair units by how they "
           "respond to the same inputs: seeded prompts along A's own DDIM trajectory; the VAE is still weight "
           "matched)", choices=MATCHINGS, applies=_matches, widget="radio", group="advanced",
           recorded_when=lambda o: o.matching != "weights"),
    Option("activation_samples", int, 4, "Activation prompts",
           "activation matching and REPAIR: the number of seeded prompts, each run at a few timesteps", low=1,
           high=MAX_ACTIVATION_SAMPLES, applies=lambda m: _matches(m) or m.repairable, widget="slider", step=1,
           group="advanced", recorded_when=lambda o: o.matching != "weights" or o.repair),
    # REPAIR (align/repair.py): after blending, map the output channels of every UNet layer that writes into a residual
    # stream to the interpolation of A's and aligned B's activation statistics on the same prompts, folded into
    # those layers' weights and biases: interpolating two models shrinks their activations.
    Option("repair", bool, False, "REPAIR",
           "after blending, run both parents and the merge on the activation prompts and rescale the UNet layers "
           "that write into the residual stream so each channel's mean and spread are the parents' interpolation "
           "again (blending shrinks them)", applies=lambda m: m.repairable, inapplicable="refuse",
           refusal="REPAIR restores the statistics of an interpolation of two models; {label} is not one (use it "
                   "with {users}).", widget="checkbox", group="advanced", recorded_when=lambda o: o.repair),
    # Block weights: 26 weights of B (BASE, IN00..IN11, M00, OUT00..OUT11) or 20 for SDXL (see
    # merge/block_weights.py); None = alpha everywhere.
    Option("blocks", tuple, None, "Block weights",
           "block weights of B: 26 comma-separated values BASE,IN00..IN11,M00,OUT00..OUT11, 25 (UNet only; "
           "BASE = alpha), 20 for SDXL (BASE,IN00..IN08,M00,OUT00..OUT08), or a preset name such as GRAD_V",
           applies=lambda m: m.block_weights,
           inapplicable="refuse", refusal="{label} reproduces a tool that had no block weights; use weighted_sum "
           "or rebasin with block weights.", optional=True, widget="text",
           recorded_when=lambda o: o.blocks is not None),
    Option("blocks_preset", str, None, "Block weight preset", "the preset name the block weights came from",
           optional=True, cli=False, user_input=False, recorded_when=lambda o: o.blocks is not None),
)

OPTIONS: dict[str, Option] = {o.name: o for o in (*CORE_OPTIONS, *ALL_PARAMS.values())}


def options_for(method: str) -> list[Option]:
    """The options that apply to `method` (its controls, in table order)."""
    info = METHODS[method]
    return [o for o in OPTIONS.values() if o.applies_to(info)]


def users_of(option: Option) -> list[str]:
    """The methods `option` applies to."""
    return [m.name for m in METHODS.values() if option.applies_to(m)]


class _Fields:
    """Behaviour of MergeOptions; its fields are the table's (see `_from_table`)."""

    if TYPE_CHECKING:  # the fields are made from OPTIONS at import time; type checkers see them as Any
        def __init__(self, *args: Any, **kwargs: Any) -> None: ...
        def __getattr__(self, name: str) -> Any: ...

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        # Before the generated __init__, whose TypeError for a misspelt option would name no field we can fix.
        _check_construction(list(cls.__dataclass_fields__), args, kwargs)  # type: ignore[attr-defined]
        return super().__new__(cls)

    @property
    def aligned(self) -> bool:
        info = METHODS.get(self.method) if isinstance(self.method, str) else None
        return bool((info is not None and info.aligns) or self.align)

    def method_params(self) -> dict[str, Any]:
        """This method's parameters by name (what its per-key function receives)."""
        return {p.name: getattr(self, p.name) for p in METHODS[self.method].params}

    def alpha_of(self, key: str) -> float:
        """The weight of B for `key`: its block's weight with block weights, else alpha."""
        if self.blocks is None:
            return self.alpha
        from .merge.block_weights import BlockWeights

        return BlockWeights(self.blocks).alpha_of(key, self.alpha)

    def with_blocks(self, values: tuple[float, ...], preset: str | None) -> MergeOptions:
        """These options with block weights (26 values, and the preset name they came from)."""
        changed = {"blocks": tuple(values), "blocks_preset": preset}  # fields a type checker cannot see (generated)
        return replace(self, **changed)  # type: ignore[type-var,return-value]

    def validate(self) -> None:
        """Raise a FieldError naming the first option of the wrong type, out of range, or not for this method."""
        method = OPTIONS["method"]
        if not isinstance(self.method, str):
            raise FieldError("method", method.problem(self.method) or "")
        if self.method not in METHODS:
            raise FieldError("method", f"Unknown method '{self.method}'; choose one of {', '.join(METHODS)}.")
        info = METHODS[self.method]
        for opt in OPTIONS.values():
            value = getattr(self, opt.name)
            applies = opt.applies_to(info)
            if not applies and opt.inapplicable == "ignore":
                continue
            problem = opt.problem(value, info)
            if problem:
                raise FieldError(opt.name, problem)
            if not applies and opt.inapplicable == "refuse" and value != opt.default:
                users = " or ".join(users_of(opt))
                raise FieldError(opt.name, opt.refusal.format(label=info.label, users=users))
        _check_device(self.device)
        self._check_combinations(info)

    def _check_combinations(self, info: MethodInfo) -> None:
        """The rules that join two options (each single value is checked by its declaration)."""
        if self.repair and "unet" not in self.parts:
            raise FieldError("repair", "REPAIR corrects UNet layers; parts must include unet.")
        if self.matching != "weights" and not self.aligned:
            raise FieldError("matching", f"matching = {self.matching} chooses how re-basin aligns B; {info.label} "
                                         "does not align (use the rebasin method, or align = true).")
        if self.blocks is not None:
            check_values(tuple(self.blocks), info.alpha_bounded)
            if any(abs(v) > MAX_DIFFERENCE_ALPHA for v in self.blocks):
                raise FieldError("blocks", f"Block weights must be between -{MAX_DIFFERENCE_ALPHA:g} and "
                                           f"{MAX_DIFFERENCE_ALPHA:g}, got {max(self.blocks, key=abs):g}.")
        if self.align and self.iterations != 1 and not info.aligns:
            raise FieldError("iterations", f"iterations apply to the rebasin method only; {info.label} with "
                                           "alignment matches once (use iterations = 1).")


def _from_table(cls: type) -> type:
    """The table's options as the class's dataclass fields, in table order (a tuple default is immutable)."""
    cls.__annotations__ = {o.name: o.kind if not o.optional else f"{o.kind.__name__} | None"
                           for o in OPTIONS.values()}
    for o in OPTIONS.values():
        setattr(cls, o.name, field(default=o.default))
    return cls


@dataclass(frozen=True)
@_from_table
class MergeOptions(_Fields):
    """Every option of one merge: `MergeOptions(method="ties", alpha=0.4, ties_density=0.3)`; the fields, their
    defaults and their checks are the option table's (`OPTIONS`)."""


# The methods whose result is (1 - a) A + a B' per key (MethodInfo.repairable).
REPAIRABLE = tuple(m.name for m in METHODS.values() if m.repairable)


def _check_device(device: str) -> None:
    if not re.fullmatch(r"cpu|cuda(:[0-9]{1,4})?", device):
        raise FieldError("device", f"device must be 'cpu', 'cuda' or 'cuda:N', got {shown(device)}.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FieldError("device", "device 'cuda' was chosen but no CUDA GPU is available; use 'cpu'.")


def _check_construction(names: list[str], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Unknown, surplus or doubled options, as one line naming them (what the dataclass would raise TypeError for)."""
    for name in kwargs:
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f"; options: {', '.join(names)}"
            raise ArgumentError(f"MergeOptions has no option '{name}'{hint}.")
    if len(args) > len(names):
        raise ArgumentError(f"MergeOptions takes at most {len(names)} options by position, got {len(args)}; "
                            "name them (MergeOptions(method=..., alpha=...)).")
    twice = [name for name in names[:len(args)] if name in kwargs]
    if twice:
        raise ArgumentError(f"MergeOptions got {twice[0]} both by position and by name.")
