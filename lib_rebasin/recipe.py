"""Recipes: a chain of merges written once (TOML), checked before any work, run in one process.

    [recipe]
    name = "DunkMash"
    precision = "fp16"        # every step's result is rounded to this, exactly as if it had been saved
    device = "cpu"
    seed = 0

    [models]
    nothing = "Nothing_v2.3.safetensors"              # a file name in the models folder
    meina = { file = "meinamix_v9.safetensors", sha256 = "..." }
    icbinp = { sha256 = "4f5a..." }                    # found by hash in the models folder

    [[step]]
    name = "m1"
    method = "rebasin"        # rebasin | weighted_sum | add_difference | legacy
    a = "nothing"
    b = "meina"
    alpha = 0.25
    iterations = 500
    parts = ["unet", "te", "vae"]

A step's `a`/`b`/`c` name a model or an *earlier* step. The last step is the output. Intermediate results stay in
memory (only while a later step still needs them), and each is exactly the tensors that saving that step to a file
would give, so a chain equals running the steps one by one with intermediate files, bit for bit.

The output's metadata carries the canonical recipe text with every input's sha256, so `recipe --from OUT` gives
back a recipe that re-runs to the same bytes.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from . import __version__
from .checkpoint import Checkpoint, file_sha256, open_checkpoint
from .errors import RebasinError
from .merge import (METHODS, CancelCheck, Diagnostics, MergeOptions, MergeResult, ProgressCallback, ProgressEvent,
                    Reporter, merge_checkpoints, merge_in_memory)
from .models import legacy_hash, open_model
from .spec import PARTS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (A1111's own Python)
    import tomli as tomllib

STEP_KEYS = {"name", "method", "a", "b", "c", "alpha", "iterations", "parts", "device", "precision", "seed",
             "max_sweeps", "tolerance"}
RECIPE_KEYS = {"name", "method", "alpha", "iterations", "parts", "precision", "device", "seed", "max_sweeps",
               "tolerance"}
MODEL_EXTENSIONS = (".safetensors", ".ckpt", ".pt")


class RecipeError(RebasinError):
    """A recipe that cannot run, with the line it comes from."""


@dataclass
class ModelRef:
    name: str
    file: str | None = None
    sha256: str | None = None
    line: int = 0


@dataclass
class Step:
    name: str
    options: MergeOptions
    a: str
    b: str
    c: str | None = None
    line: int = 0


@dataclass
class Recipe:
    name: str = "recipe"
    models: dict[str, ModelRef] = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)
    defaults: dict[str, Any] = field(default_factory=dict)

    def to_toml(self) -> str:
        """The canonical text: parse(to_toml()) round-trips, and equal recipes give equal text."""
        lines = ["# lib_rebasin recipe", "[recipe]", f"name = {_q(self.name)}"]
        lines += [f"{k} = {_v(v)}" for k, v in sorted(self.defaults.items())]
        lines += ["", "[models]"]
        for m in self.models.values():
            fields = [f"{k} = {_q(v)}" for k, v in (("file", m.file), ("sha256", m.sha256)) if v]
            lines.append(f"{_key(m.name)} = {{ {', '.join(fields)} }}")
        for s in self.steps:
            o = s.options
            lines += ["", "[[step]]", f"name = {_q(s.name)}", f"method = {_q(o.method)}", f"a = {_q(s.a)}",
                      f"b = {_q(s.b)}"]
            if s.c is not None:
                lines.append(f"c = {_q(s.c)}")
            lines += [f"alpha = {_v(o.alpha)}", f"iterations = {o.iterations}", f"parts = {_v(list(o.parts))}",
                      f"device = {_q(o.device)}", f"precision = {_q(o.precision)}", f"seed = {o.seed}",
                      f"max_sweeps = {o.max_sweeps}", f"tolerance = {_v(float(o.tolerance))}"]
        return "\n".join(lines) + "\n"


def _q(s: str) -> str:
    return json.dumps(s)


def _v(v: Any) -> str:
    return json.dumps(v) if not isinstance(v, float) else repr(v)


def _key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else _q(k)


# -- parsing ---------------------------------------------------------------------------------------------------

def _header_lines(text: str) -> tuple[list[int], dict[str, int], dict[tuple[int, str], int]]:
    """Line numbers of each [[step]] header, of each [models] entry, and of `key =` lines inside each step."""
    step_lines: list[int] = []
    model_lines: dict[str, int] = {}
    key_lines: dict[tuple[int, str], int] = {}
    section = ""
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line.startswith("[[step]]"):
            step_lines.append(n)
            section = "step"
        elif line.startswith("["):
            section = line.strip("[] ")
        elif "=" in line and not line.startswith("#"):
            key = line.split("=", 1)[0].strip().strip('"')
            if section == "models":
                model_lines[key] = n
            elif section == "step":
                key_lines[(len(step_lines) - 1, key)] = n
    return step_lines, model_lines, key_lines


def parse_recipe(text: str, source: str = "recipe") -> Recipe:
    """Parse and check a recipe; every error names its line."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{source}: {e}") from None
    step_lines, model_lines, key_lines = _header_lines(text)

    def fail(line: int, msg: str) -> RecipeError:
        return RecipeError(f"{source}, line {line}: {msg}" if line else f"{source}: {msg}")

    unknown = set(data) - {"recipe", "models", "step"}
    if unknown:
        raise fail(0, f"unknown section(s) {', '.join(sorted(unknown))}; expected [recipe], [models], [[step]].")
    head = data.get("recipe", {})
    bad = set(head) - RECIPE_KEYS
    if bad:
        raise fail(0, f"unknown [recipe] key(s) {', '.join(sorted(bad))}.")
    recipe = Recipe(name=str(head.get("name", "recipe")), defaults={k: v for k, v in head.items() if k != "name"})

    for name, value in data.get("models", {}).items():
        line = model_lines.get(name, 0)
        if isinstance(value, str):
            ref = ModelRef(name, file=value, line=line)
        elif isinstance(value, dict) and set(value) <= {"file", "sha256"} and value:
            ref = ModelRef(name, value.get("file"), value.get("sha256"), line)
        else:
            raise fail(line, f"model '{name}' must be a file name or {{ file = ..., sha256 = ... }}.")
        if ref.sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{10}|[0-9a-fA-F]{64}", ref.sha256):
            raise fail(line, f"model '{name}': sha256 must be 64 hex digits (or the WebUI's 10-digit short hash).")
        recipe.models[name] = ref

    steps = data.get("step", [])
    if not steps:
        raise fail(0, "a recipe needs at least one [[step]].")
    known: set[str] = set(recipe.models)
    later = {str(s.get("name", f"step{i + 1}")): i for i, s in enumerate(steps)}
    for i, raw in enumerate(steps):
        line = step_lines[i] if i < len(step_lines) else 0
        bad = set(raw) - STEP_KEYS
        if bad:
            raise fail(key_lines.get((i, sorted(bad)[0]), line), f"unknown step key(s) {', '.join(sorted(bad))}.")
        name = str(raw.get("name", f"step{i + 1}"))
        if name in known:
            raise fail(line, f"the name '{name}' is already used by a model or an earlier step.")
        settings = {**recipe.defaults, **{k: v for k, v in raw.items() if k in MergeOptions.__dataclass_fields__}}
        try:
            options = MergeOptions(**{**settings, "parts": tuple(settings.get("parts", PARTS))})
            options.validate()
        except (TypeError, RebasinError) as e:
            raise fail(line, f"step '{name}': {e}") from None
        refs = {}
        for slot in ("a", "b", "c"):
            ref = raw.get(slot)
            if ref is None:
                continue
            ref_line = key_lines.get((i, slot), line)
            if ref not in known:
                if ref in later and later[ref] >= i:
                    raise fail(ref_line, f"step '{name}' uses '{ref}', which is only made by a later step.")
                raise fail(ref_line, f"step '{name}': '{ref}' is neither a model in [models] nor an earlier step.")
            refs[slot] = ref
        if "a" not in refs or "b" not in refs:
            raise fail(line, f"step '{name}' needs both a and b.")
        if METHODS[options.method].needs_c and "c" not in refs:
            raise fail(line, f"step '{name}': {METHODS[options.method].label} needs c.")
        recipe.steps.append(Step(name, options, refs["a"], refs["b"], refs.get("c"), line))
        known.add(name)
    return recipe


# -- resolving models ------------------------------------------------------------------------------------------

def resolve_models(recipe: Recipe, models_dir: Path) -> dict[str, Path]:
    """Find every model file (by name, or by hash in `models_dir`); raise for the first one that is missing."""
    found: dict[str, Path] = {}
    hashes: dict[Path, str] = {}

    def sha(p: Path) -> str:
        if p not in hashes:
            hashes[p] = file_sha256(p)
        return hashes[p]

    for ref in recipe.models.values():
        path = None
        if ref.file is not None:
            p = Path(ref.file) if Path(ref.file).is_absolute() else models_dir / ref.file
            if p.is_file():
                path = p
            elif ref.sha256 is None:
                raise RecipeError(f"line {ref.line}: model '{ref.name}': file {ref.file} not found in {models_dir}.")
        if path is not None and ref.sha256 and not sha(path).startswith(ref.sha256.lower()):
            raise RecipeError(f"line {ref.line}: model '{ref.name}': {path.name} does not have sha256 {ref.sha256}.")
        if path is None and ref.sha256:
            candidates = sorted(p for p in models_dir.rglob("*") if p.suffix.lower() in MODEL_EXTENSIONS)
            path = next((p for p in candidates if sha(p).startswith(ref.sha256.lower())), None)
            if path is None:
                raise RecipeError(f"line {ref.line}: model '{ref.name}': no file in {models_dir} has sha256 "
                                  f"{ref.sha256}.")
        assert path is not None
        found[ref.name] = path
    return found


# -- running ---------------------------------------------------------------------------------------------------

@dataclass
class RecipeResult:
    output: Path
    steps: list[tuple[str, Diagnostics]]
    metadata: dict[str, str]

    def summary_lines(self) -> list[str]:
        out = []
        for name, d in self.steps:
            out.append(f"Step {name}:")
            out += [f"  {line}" for line in d.summary_lines()]
        return out


def run_recipe(recipe: Recipe, models_dir: Path, output: str | os.PathLike[str], overwrite: bool = False,
               progress: ProgressCallback | None = None, cancel: CancelCheck | None = None,
               extra_metadata: dict[str, str] | None = None) -> RecipeResult:
    """Run every step; only the last one is written (atomically). Raises RebasinError; no file then."""
    from .checkpoint import check_output_path

    out_path = check_output_path(output, overwrite)
    paths = resolve_models(recipe, models_dir)
    # Check every step's inputs from the headers before any work (architectures, shapes, parts).
    for step in recipe.steps:
        for slot in ("a", "b", "c"):
            ref = getattr(step, slot)
            if ref in paths:
                open_model(paths[ref], slot.upper()).close()

    canonical = _canonical(recipe, paths)
    last_use = {}
    for i, step in enumerate(recipe.steps):
        for ref in (step.a, step.b, step.c):
            if ref is not None:
                last_use[ref] = i
    results: dict[str, Checkpoint] = {}
    done: list[tuple[str, Diagnostics]] = []
    n = len(recipe.steps)
    inputs = {name: {"file": p.name, "sha256": canonical.models[name].sha256} for name, p in paths.items()}

    for i, step in enumerate(recipe.steps):
        def step_progress(ev: ProgressEvent, i: int = i, step: Step = step) -> None:
            if progress is not None:
                progress(ProgressEvent((i + ev.fraction) / n, ev.stage,
                                       f"step {i + 1}/{n} ({step.name}): {ev.message}", None))

        srcs = [results.get(r) or paths[r] if r is not None else None for r in (step.a, step.b, step.c)]
        if i < n - 1:
            ckpt, diag = merge_in_memory(srcs[0], srcs[1], step.options, c=srcs[2],
                                         report=Reporter(step_progress, cancel), name=step.name)
            results[step.name] = ckpt
            done.append((step.name, diag))
        else:
            def metadata_hook(diag: Diagnostics) -> dict[str, str]:
                return _recipe_metadata(canonical, paths, inputs, done + [(step.name, diag)])

            res: MergeResult = merge_checkpoints(srcs[0], srcs[1], out_path, step.options, c=srcs[2],
                                                 overwrite=overwrite, progress=step_progress, cancel=cancel,
                                                 extra_metadata=extra_metadata, metadata_hook=metadata_hook)
            done.append((step.name, res.diagnostics))
            return RecipeResult(res.output, done, res.metadata)
        for name in [r for r, last in last_use.items() if last <= i and r in results]:
            results.pop(name).close()  # no later step needs it: free the memory now
    raise AssertionError("unreachable")


def _canonical(recipe: Recipe, paths: dict[str, Path]) -> Recipe:
    """The recipe with every model pinned to its file name and full sha256."""
    models = {name: ModelRef(name, paths[name].name, file_sha256(paths[name]), ref.line)
              for name, ref in recipe.models.items()}
    return replace(recipe, models=models)


def _recipe_metadata(recipe: Recipe, paths: dict[str, Path], inputs: dict[str, dict[str, str | None]],
                     steps: list[tuple[str, Diagnostics]]) -> dict[str, str]:
    text = recipe.to_toml()
    merge_models: dict[str, object] = {}
    for name, p in paths.items():
        sha = inputs[name]["sha256"]
        with open_checkpoint(p) as ck:
            own = ck.metadata.get("sd_merge_recipe")
            history = ck.metadata.get("sd_merge_models")
        merge_models[str(sha)] = {"name": p.stem, "legacy_hash": legacy_hash(p),
                                  "sd_merge_recipe": _json_or_none(own)}
        if history:
            parsed = _json_or_none(history)
            if isinstance(parsed, dict):
                merge_models.update(parsed)
    recipe_meta = {"type": "lib_rebasin_recipe", "version": __version__, "name": recipe.name, "recipe": text,
                   "models": inputs}
    ours = {"version": __version__, "recipe_toml": text, "inputs": inputs,
            "steps": [{"name": n, "diagnostics": {k: v for k, v in d.to_dict().items() if k != "seconds"}}
                      for n, d in steps]}
    return {"sd_merge_recipe": json.dumps(recipe_meta), "sd_merge_models": json.dumps(merge_models),
            "lib_rebasin": json.dumps(ours)}


def _json_or_none(raw: str | None) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return None


def recipe_from_checkpoint(path: str | os.PathLike[str]) -> str:
    """The recipe text stored in a checkpoint's metadata (a recipe run, or a single merge made by this tool)."""
    with open_checkpoint(path) as ck:
        meta = ck.metadata
    ours = _json_or_none(meta.get("lib_rebasin"))
    if not isinstance(ours, dict):
        raise RecipeError(f"{Path(path).name} was not made by lib_rebasin (no 'lib_rebasin' metadata).")
    if "recipe_toml" in ours:
        return str(ours["recipe_toml"])
    single = ours.get("recipe")
    webui = _json_or_none(meta.get("sd_merge_recipe")) or {}
    if not isinstance(single, dict):
        raise RecipeError(f"{Path(path).name}: its lib_rebasin metadata holds no recipe.")
    models = single.get("models", {})
    hashes = {"A": webui.get("primary_model_hash"), "B": webui.get("secondary_model_hash"),
              "C": webui.get("tertiary_model_hash")}
    refs = {label.lower(): ModelRef(label.lower(), file, hashes.get(label)) for label, file in models.items()}
    opts = MergeOptions(method=single["method"], alpha=single["alpha"], iterations=single["iterations"],
                        parts=tuple(single["parts"]), device=single["device"], precision=single["precision"],
                        seed=single["seed"], max_sweeps=single["max_sweeps"],
                        tolerance=single.get("tolerance", 0.0))
    step = Step("merge", opts, "a", "b", "c" if "c" in refs else None)
    return Recipe(name=Path(path).stem, models=refs, steps=[step]).to_toml()


def load_recipe(path: str | os.PathLike[str]) -> Recipe:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise RecipeError(f"Cannot read recipe {p}: {e.strerror}.") from None
    return parse_recipe(text, p.name)

