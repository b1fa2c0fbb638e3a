"""The recipe format: a chain of merges written once in TOML, its parts as data, and its canonical text.

    [recipe]
    name = "DunkMash"
    precision = "fp16"        # every step's result is rounded to this, exactly as if it had been saved
    device = "cpu"
    seed = 0
    bake_vae = "mse"          # optional: the output gets this model's VAE (a VAE file, or a checkpoint's)

    [models]
    nothing = "Nothing_v2.3.safetensors"              # a file name in the models folder
    meina = { file = "meinamix_v9.safetensors", sha256 = "..." }
    icbinp = { sha256 = "4f5a..." }                    # found by hash in the models folder
    mse = "vae-ft-mse-840000-ema-pruned.safetensors"  # a VAE: also looked for in --vae-dir

    [[step]]
    name = "m1"
    method = "rebasin"        # any method of methods.py; every option of options.OPTIONS is a key
    a = "nothing"
    b = "meina"
    alpha = 0.25
    iterations = 500
    parts = ["unet", "te", "vae"]

A step's `a`/`b`/`c` name a model or an *earlier* step; the last step is the output. The keys a step and [recipe]
take are the option table's, and `Recipe.to_toml` writes each option where the table records it, so equal recipes
give equal text. Reading is `parse.py`, finding the files `resolve.py`, running `run.py`, and reading a recipe back
from an output's metadata `from_output.py`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..arguments import check_arguments, is_finite_number
from ..errors import RebasinError
from ..merge.block_weights import parse_blocks
from ..messages import shown
from ..option import Option
from ..options import OPTIONS, MergeOptions

# Every option a user sets (options.OPTIONS, method parameters included) is a step key and a recipe default.
OPTION_KEYS = {o.name for o in OPTIONS.values() if o.user_input}
STEP_KEYS = {"name", "a", "b", "c", *OPTION_KEYS}
RECIPE_KEYS = {"name", "bake_vae", *OPTION_KEYS}
MODEL_KEYS = {"file", "sha256", "folder"}


class RecipeError(RebasinError):
    """A recipe that cannot run, with the line it comes from."""


@dataclass
class ModelRef:
    name: str
    file: str | None = None
    sha256: str | None = None
    line: int = 0
    # The folder the file was read from when the recipe was recorded (`recipe --from`): searched by sha256 only,
    # so it can only ever supply the very file that was merged.
    folder: str | None = None


@dataclass
class Step:
    name: str
    options: MergeOptions
    a: str
    b: str
    c: str | None = None
    line: int = 0
    # The last step only: alpha as a list, a sweep (merge/sweep.py) writing one output per value from the earlier
    # steps' results, computed once; `options.alpha` is the first value.
    alphas: tuple[float, ...] | None = None


@dataclass
class Recipe:
    name: str = "recipe"
    models: dict[str, ModelRef] = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)
    defaults: dict[str, Any] = field(default_factory=dict)
    folder: Path | None = None  # the recipe file's folder, where models are also looked for by sha256
    # A [models] name whose VAE (a VAE file, or a checkpoint's) goes into the output, as the WebUI's "bake in VAE".
    bake_vae: str | None = None

    def output_root(self) -> str:
        """The model whose keys the output has: the last step's A, followed back through the steps to a model."""
        by_name = {s.name: s for s in self.steps}
        root = self.steps[-1].a
        while root in by_name:
            root = by_name[root].a
        return root

    def to_toml(self) -> str:
        """The canonical text: parse(to_toml()) round-trips, and equal recipes give equal text."""
        lines = ["# lib_rebasin recipe", "[recipe]", f"name = {toml_string(self.name)}"]
        if self.bake_vae is not None:
            lines.append(f"bake_vae = {toml_string(self.bake_vae)}")
        lines += [f"{k} = {_v(v)}" for k, v in sorted(self.defaults.items())]
        lines += ["", "[models]"]
        for m in self.models.values():
            fields = [f"{k} = {toml_string(v)}"
                      for k, v in (("file", m.file), ("sha256", m.sha256), ("folder", m.folder)) if v]
            lines.append(f"{toml_key(m.name)} = {{ {', '.join(fields)} }}")
        for s in self.steps:
            lines += ["", "[[step]]", f"name = {toml_string(s.name)}", f"method = {toml_string(s.options.method)}",
                      f"a = {toml_string(s.a)}", f"b = {toml_string(s.b)}"]
            if s.c is not None:
                lines.append(f"c = {toml_string(s.c)}")
            swept = f"alpha = {_v([float(x) for x in s.alphas])}" if s.alphas is not None else None
            lines += [swept if swept and line.startswith("alpha =") else line for line in _option_lines(s.options)]
        return "\n".join(lines) + "\n"

    def candidates(self) -> list[Recipe]:
        """One recipe per value of the last step's alpha list (itself when it has none): each is what a sweep's
        output records, and re-runs to that output alone."""
        last = self.steps[-1]
        if last.alphas is None:
            return [self]
        return [replace(self, steps=[*self.steps[:-1], replace(last, options=replace(last.options, **{"alpha": a}),
                                                                  alphas=None)]) for a in last.alphas]


def _option_lines(o: MergeOptions) -> list[str]:
    """A step's options in table order, each where the table records it (`Option.recorded`); block weights last,
    as their preset's name when they came from one."""
    lines = [f"{opt.name} = {_toml(opt, getattr(o, opt.name))}" for opt in OPTIONS.values()
             if opt.user_input and opt.name not in ("method", "blocks") and opt.recorded(o)]
    if o.blocks is not None:
        preset = o.blocks_preset
        lines.append(f"blocks = {toml_string(preset) if preset else _v([float(v) for v in o.blocks])}")
    return lines


def _toml(opt: Option, value: Any) -> str:
    """A value in its canonical TOML: a float option always as a float, so equal options give equal text."""
    if opt.kind is float:
        return repr(float(value))
    if opt.kind is tuple:
        return _v(list(value))
    return _v(value)


def step_options(settings: dict[str, Any]) -> MergeOptions:
    """MergeOptions from a step's (or an API request's) settings; `blocks` may be a preset name, a string of 26
    or 25 comma-separated values, or a list of them. Raises RebasinError."""
    check_arguments("step_options", settings=settings)
    settings = dict(settings)
    blocks = settings.pop("blocks", None)
    settings.pop("blocks_preset", None)
    if isinstance(settings.get("parts"), list):
        settings["parts"] = tuple(settings["parts"])
    options = MergeOptions(**settings)
    if blocks is not None:
        if isinstance(blocks, (list, tuple)):
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in blocks):
                raise RebasinError("blocks must be numbers, a string of them, or a preset name.")
            bad = next((i for i, v in enumerate(blocks) if not is_finite_number(v)), None)
            if bad is not None:  # an integer beyond a float's range included
                raise RebasinError(f"blocks value {bad + 1} must be a finite number, got {shown(blocks[bad])}.")
            blocks = ",".join(repr(float(v)) for v in blocks)
        if not isinstance(blocks, str):
            raise RebasinError("blocks must be a preset name, 26 (or 25) comma-separated values, or a list of them.")
        bw = parse_blocks(blocks, options.alpha)
        options = options.with_blocks(bw.values, bw.preset)
    return options


def toml_string(s: str) -> str:
    """A TOML basic string (JSON's escaping is TOML's)."""
    return json.dumps(s)


def _v(v: Any) -> str:
    return json.dumps(v) if not isinstance(v, float) else repr(v)


def toml_key(k: str) -> str:
    """A TOML key: bare when it can be, quoted otherwise."""
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else toml_string(k)

