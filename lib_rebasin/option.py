"""One option of a merge, declared once: its type, default, bounds or choices, words, and where it applies.

`options.py` gathers these into the option table (`OPTIONS`); `MergeOptions`, its validation, the CLI flags, recipe
keys, provenance, the HTTP request and the tab's controls are all made from it. A method declares its own
parameters as `Option`s next to its function (`methods.py`), so a new parameter is one declaration.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from .arguments import is_finite_number
from .messages import shown

if TYPE_CHECKING:
    from .methods import MethodInfo

Widget = Literal["slider", "number", "checkbox", "dropdown", "radio", "checkboxes", "text"]
# What a value for a method the option does not apply to means:
#   "check":  checked like any other value, then ignored by that method (seed, tolerance, ...);
#   "ignore": neither checked nor used (a method parameter: a recipe's default for TIES is no error in a DARE step);
#   "refuse": anything but the default is refused, naming the option (REPAIR for add_difference, align for legacy).
Inapplicable = Literal["check", "ignore", "refuse"]

_TYPE_WORDS = {int: "a whole number", float: "a number", str: "a string", bool: "true or false",
               tuple: "a list"}


def _always(info: MethodInfo) -> bool:
    return True


@dataclass(frozen=True)
class Option:
    name: str                    # the MergeOptions field, the recipe key, the request field; CLI: --name-with-dashes
    kind: type                   # bool, int, float, str, or tuple (several of `choices`)
    default: Any
    label: str                   # a control's label
    help: str                    # one sentence, for --help, the tab's info and the API's listing
    low: float | None = None     # bounds of a number; None = open-ended
    high: float | None = None
    low_open: bool = False       # low itself not allowed
    high_open: bool = False
    choices: tuple[str, ...] = ()
    # The methods it applies to, by their MethodInfo flags; None: the methods that list it in their params.
    applies: Callable[[MethodInfo], bool] | None = _always
    inapplicable: Inapplicable = "check"
    refusal: str = ""            # with "refuse": why, formatted with {label} (the method's) and {users}
    widget: Widget = "number"
    group: Literal["basic", "advanced"] = "basic"
    step: float | None = None    # a slider's step
    optional: bool = False       # None is allowed (and means "not set")
    cli: bool = True             # has a CLI flag
    user_input: bool = True      # set by users (else derived from another option, e.g. the blocks' preset name)
    # Recipes and output metadata record it only when this holds for the options (None: always), so outputs made
    # before the option existed keep the bytes they had.
    recorded_when: Callable[[Any], bool] | None = None
    webui_name: str = ""         # its key in A1111's sd_merge_recipe, where that differs from `name`
    method_param: bool = False   # declared by a method (methods.py), gathered after the core options
    # Bounds that depend on the method (alpha: [0, 1] for an interpolation, wider for a factor on a difference);
    # `low` / `high` are then the widest.
    method_bounds: Callable[[MethodInfo], tuple[float, float]] | None = None
    # A list of values asks for a sweep (merge/sweep.py): one output per value, the rest of the merge shared. It
    # stays one value in MergeOptions; the CLI flag, a recipe's final step and the API's sweep route take a list.
    sweep: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def applies_to(self, info: MethodInfo) -> bool:
        if self.applies is None:
            return any(p.name == self.name for p in info.params)
        return self.applies(info)

    def bounds(self, info: MethodInfo | None = None) -> tuple[float | None, float | None]:
        """(low, high) for the method `info` (None: the widest)."""
        if self.method_bounds is not None and info is not None:
            return self.method_bounds(info)
        return self.low, self.high

    def bounds_text(self, info: MethodInfo | None = None) -> str:
        """"between 1 and 64" for whole numbers, interval notation "[0, 1)" otherwise."""
        low, high = self.bounds(info)
        if low is None or high is None:
            return f"at least {_num(low)}" if low is not None else f"at most {_num(high)}"
        if self.kind is int and not (self.low_open or self.high_open):
            return f"between {_num(low)} and {_num(high)}"
        return f"in {'(' if self.low_open else '['}{_num(low)}, {_num(high)}{')' if self.high_open else ']'}"

    def problem(self, value: object, info: MethodInfo | None = None) -> str | None:
        """The one-line problem with `value` for this option (type, finiteness, bounds, choices) for the method
        `info` (None: any method), or None."""
        specific = info is not None and (self.method_param or self.method_bounds is not None)
        where = f" for {info.label}" if specific and info is not None else ""
        if value is None and self.optional:
            return None
        if self.kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif self.kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif self.kind is tuple:
            ok = isinstance(value, (tuple, list))
        else:
            ok = isinstance(value, self.kind)
        if not ok:
            return f"{self.name} must be {_TYPE_WORDS[self.kind]}{where}, got {shown(value)}."
        if self.kind is float and not is_finite_number(value):
            return f"{self.name} must be a finite number{where}, got {shown(value)}."
        if self.kind in (int, float):
            v: Any = value
            low, high = self.bounds(info)
            if ((low is not None and (v < low or (self.low_open and v == low)))
                    or (high is not None and (v > high or (self.high_open and v == high)))):
                return f"{self.name} must be {self.bounds_text(info)}{where}, got {shown(value)}."
        if self.choices and self.kind is str and value not in self.choices:
            return f"{self.name} must be one of {', '.join(self.choices)}, got {shown(value)}."
        if self.choices and self.kind is tuple:
            items: Any = value
            if not items or not all(isinstance(x, str) and x in self.choices for x in items):
                return (f"{self.name} must be a non-empty subset of {', '.join(self.choices)}; got "
                        f"{shown(list(items))}.")
        return None

    def recorded(self, options: Any) -> bool:
        """Whether a recipe or an output's metadata records this option for `options`."""
        return self.recorded_when is None or bool(self.recorded_when(options))

    def declaration(self, info: MethodInfo | None = None) -> dict[str, Any]:
        """The declaration as JSON-able data (the API's method listing): what a client needs to build a control,
        with the bounds for the method `info`."""
        out: dict[str, Any] = {"name": self.name, "type": self.kind.__name__ if self.kind is not tuple else "list",
                               "default": list(self.default) if isinstance(self.default, tuple) else self.default,
                               "label": self.label, "help": self.help, "widget": self.widget, "group": self.group}
        low, high = self.bounds(info)
        if low is not None or high is not None:
            out.update({"low": low, "high": high, "low_open": self.low_open, "high_open": self.high_open})
        if self.choices:
            out["choices"] = list(self.choices)
        if self.step is not None:
            out["step"] = self.step
        if self.optional:
            out["optional"] = True
        return out


def _num(v: int | float | None) -> str:
    if isinstance(v, int) and abs(v) >= 10**15 and (v + 1) & v == 0:
        return f"2**{(v + 1).bit_length() - 1} - 1"   # 2**63 - 1: the seed's bound, as people write it
    return f"{v:g}" if isinstance(v, float) else str(v)
