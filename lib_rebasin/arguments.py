"""The one check of a public function's arguments (merges, recipes, inspect, the synthetic models and the demo).

A caller passing None for the output, a string for the options or a number for a callback gets one ArgumentError
naming the function, the argument and what it must be, before any work: never an AssertionError, TypeError or
AttributeError from deep inside. Each argument name means the same thing in every public function, so one table
of rules serves them all. Values the options' own `validate` checks (ranges, methods) are left to it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

from .errors import ArgumentError
from .messages import shown

PATH = "a file path (a str or pathlib.Path)"
SOURCE = "a checkpoint file path (a str or pathlib.Path) or an open Checkpoint"


def check_arguments(function: str, may_be_none: tuple[str, ...] = (), **arguments: Any) -> None:
    """Raise ArgumentError for the first argument that breaks its name's rule (`_RULES`); the names in
    `may_be_none` may also be None in this function."""
    for name, value in arguments.items():
        if value is None and name in may_be_none:
            continue
        expected = _RULES[name](value)
        if expected is not None:
            raise ArgumentError(f"{function}: {_LABELS.get(name, name)} must be {expected}, got {shown(value)}.")


def _is_path(v: Any) -> bool:
    return isinstance(v, str) or (isinstance(v, os.PathLike) and isinstance(os.fspath(v), str))


def _path(v: Any) -> str | None:
    return None if _is_path(v) else PATH


def _optional(rule: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        expected = rule(v) if v is not None else None
        return None if expected is None else f"{expected} or None"
    return check


def _source(v: Any) -> str | None:
    from .io.checkpoint import Checkpoint

    return None if _is_path(v) or isinstance(v, Checkpoint) else SOURCE


def _instance(kind: str, expected: str) -> Callable[[Any], str | None]:
    """A rule for an object of one of our classes, imported when first checked (no import cycle)."""
    module, _, name = kind.rpartition(".")

    def check(v: Any) -> str | None:
        import importlib

        cls = getattr(importlib.import_module(module, __package__), name)
        return None if isinstance(v, cls) else expected
    return check


def _bool(v: Any) -> str | None:
    return None if isinstance(v, bool) else "True or False"


def _str(v: Any) -> str | None:
    return None if isinstance(v, str) else "a string"


def _callable(v: Any) -> str | None:
    return None if callable(v) else "a function"


def _int(v: Any) -> str | None:
    return None if isinstance(v, int) and not isinstance(v, bool) else "a whole number"


def is_finite_number(v: Any) -> bool:
    """An int or float (not a bool) that is finite as a float: an integer too large for a float is not."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def _number(v: Any) -> str | None:
    return None if is_finite_number(v) else "a finite number"


def _metadata(v: Any) -> str | None:
    ok = isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, str) for k, x in v.items())
    return None if ok else "a dict of str to str"


def _settings(v: Any) -> str | None:
    return None if isinstance(v, dict) and all(isinstance(k, str) for k in v) else "a dict of option names to values"


def _tensors(v: Any) -> str | None:
    import torch

    ok = isinstance(v, dict) and all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in v.items())
    return None if ok else "a dict of str to torch.Tensor"


def _precision(v: Any) -> str | None:
    from .io.precisions import PRECISIONS

    return None if isinstance(v, str) and v in PRECISIONS else f"one of {', '.join(map(repr, PRECISIONS))}"


def _config(v: Any) -> str | None:
    from .sd1.config import SD1Config
    from .sd1.synthetic import SCALES
    from .sdxl.config import SDXLConfig
    from .sdxl.synthetic import SCALES as SDXL_SCALES

    names = dict.fromkeys([*SCALES, *SDXL_SCALES])  # a scale name's architecture is the generator's
    ok = isinstance(v, (SD1Config, SDXLConfig)) or (isinstance(v, str) and v in names)
    return None if ok else f"an SD1Config, an SDXLConfig or one of {', '.join(map(repr, names))}"


_RULES: dict[str, Callable[[Any], str | None]] = {
    "a": _source, "b": _source, "c": _optional(_source), "bake_vae": _optional(_source),
    "output": _path, "path": _path, "folder": _path, "models_dir": _path,
    "vae_dir": _optional(_path),
    "options": _instance(".options.MergeOptions", "a MergeOptions (from lib_rebasin.options import MergeOptions)"),
    "recipe": _instance(".recipe.format.Recipe", "a Recipe (from load_recipe() or parse_recipe())"),
    "report": _optional(_instance(".progress.Reporter", "a Reporter")),
    "overwrite": _bool, "confine": _bool, "tool_dot": _bool,
    "progress": _optional(_callable), "cancel": _optional(_callable), "metadata_hook": _optional(_callable),
    "on_iteration": _optional(_callable), "get_a": _callable, "get_b": _callable,
    "extra_metadata": _optional(_metadata), "extra": _optional(_tensors), "settings": _settings,
    "name": _str, "text": _str, "source": _str,
    "seed": _int, "perm_seed": _int, "base_seed": _optional(_int), "iterations": _int, "steps": _int,
    "alpha": _number, "delta": _number, "precision": _precision, "config": _config,
}


_LABELS = {"a": "a (model A)", "b": "b (model B)", "c": "c (model C)"}
