"""Reading a recipe: its TOML text (or file) into a checked `Recipe`, every error naming the line it comes from."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from ..arguments import check_arguments
from ..errors import RebasinError
from ..io.parsing import MAX_TOML_CHARS, parse_toml
from ..merge.sweep import sweep_options
from ..methods import METHODS
from ..options import MergeOptions
from ..parts import PARTS
from .format import (
    MODEL_KEYS,
    RECIPE_KEYS,
    STEP_KEYS,
    ModelRef,
    Recipe,
    RecipeError,
    Step,
    step_options,
    toml_key,
    toml_string,
)


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
    check_arguments("parse_recipe", text=text, source=source)
    data = parse_toml(text, lambda why: RecipeError(f"{source}: {why}"))
    step_lines, model_lines, key_lines = _header_lines(text)

    def fail(line: int, msg: str) -> RecipeError:
        return RecipeError(f"{source}, line {line}: {msg}" if line else f"{source}: {msg}")

    unknown = set(data) - {"recipe", "models", "step"}
    if unknown:
        raise fail(0, f"unknown section(s) {', '.join(sorted(unknown))}; expected [recipe], [models], [[step]].")
    head = data.get("recipe", {})
    if not isinstance(head, dict):
        raise fail(0, "'recipe' must be a [recipe] table.")
    bad = set(head) - RECIPE_KEYS
    if bad:
        raise fail(0, f"unknown [recipe] key(s) {', '.join(sorted(bad))}.")
    if not isinstance(head.get("name", ""), str):
        raise fail(0, "[recipe] name must be a string.")
    bake_vae = head.get("bake_vae")
    if bake_vae is not None and not isinstance(bake_vae, str):
        raise fail(0, f"[recipe] bake_vae must be a string naming a model in [models], got {_show(bake_vae)}.")
    recipe = Recipe(name=str(head.get("name", "recipe")), bake_vae=bake_vae,
                    defaults={k: v for k, v in head.items() if k not in ("name", "bake_vae")})

    models = data.get("models", {})
    if not isinstance(models, dict):
        raise fail(0, "'models' must be a [models] table of name = file entries.")
    for name, value in models.items():
        line = model_lines.get(name, 0)
        if isinstance(value, str):
            ref = ModelRef(name, file=value, line=line)
        elif (isinstance(value, dict) and set(value) <= MODEL_KEYS and ({"file", "sha256"} & set(value))
              and all(isinstance(v, str) for v in value.values())):
            ref = ModelRef(name, value.get("file"), value.get("sha256"), line, value.get("folder"))
        else:
            raise fail(line, f"model '{name}' must be a file name or {{ file = \"...\", sha256 = \"...\" }} "
                             "(strings).")
        if ref.sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{10}|[0-9a-fA-F]{64}", ref.sha256):
            raise fail(line, f"model '{name}': sha256 must be 64 hex digits (or the WebUI's 10-digit short hash).")
        if ref.file is not None:
            problem = _unsafe_name(ref.file)
            if problem:
                raise fail(line, f"model '{name}': file {_show(ref.file)} {problem}; name a file inside the models "
                                 "folder (--models-dir) by its relative path.")
        if ref.folder is not None and (not os.path.isabs(ref.folder) or "\0" in ref.folder):
            raise fail(line, f"model '{name}': folder must be an absolute path (where the file was found).")
        recipe.models[name] = ref
    if bake_vae is not None and bake_vae not in recipe.models:
        raise fail(0, f"[recipe] bake_vae = {toml_string(bake_vae)} is not a model in [models]; add the VAE file there "
                      f"(e.g. {toml_key(bake_vae)} = \"vae-ft-mse-840000-ema-pruned.safetensors\").")

    steps = data.get("step", [])
    if not isinstance(steps, list) or not all(isinstance(st, dict) for st in steps):
        raise fail(0, "'step' must be a list of [[step]] tables.")
    if not steps:
        raise fail(0, "a recipe needs at least one [[step]].")
    known: set[str] = set(recipe.models)
    later = {str(s.get("name", f"step{i + 1}")): i for i, s in enumerate(steps)}
    for i, raw in enumerate(steps):
        line = step_lines[i] if i < len(step_lines) else 0
        bad = set(raw) - STEP_KEYS
        if bad:
            raise fail(key_lines.get((i, sorted(bad)[0]), line), f"unknown step key(s) {', '.join(sorted(bad))}.")
        name = raw.get("name", f"step{i + 1}")
        if not isinstance(name, str) or not name:
            raise fail(key_lines.get((i, "name"), line), f"step {i + 1}: name must be a non-empty string.")
        if name in known:
            raise fail(line, f"the name '{name}' is already used by a model or an earlier step.")
        settings = {**recipe.defaults, **{k: v for k, v in raw.items() if k in MergeOptions.__dataclass_fields__}}
        alphas = settings.get("alpha") if isinstance(settings.get("alpha"), list) else None
        if alphas is not None:
            at = key_lines.get((i, "alpha"), line) if "alpha" in raw else 0
            if "alpha" not in raw or i < len(steps) - 1:
                raise fail(at, f"step '{name}': alpha is a list (a sweep) only in the last step, which writes one "
                               "output per value (-o with {alpha}); an earlier step's single result feeds the next.")
            if not alphas:
                raise fail(at, f"step '{name}': alpha = [] lists no value; give one or more.")
            settings["alpha"] = alphas[0]
        parts = settings.get("parts", PARTS)
        try:
            options = step_options({**settings, "parts": tuple(parts) if isinstance(parts, list) else parts})
            options.validate()
            if alphas is not None:
                sweep_options(options, alphas)
        except RebasinError as e:
            field_name = str(e).split(" ", 1)[0]
            # a message starts with its key ("seed must ..."), or with the key's name in capitals ("REPAIR ...")
            at = key_lines.get((i, field_name), key_lines.get((i, field_name.lower()), line))
            raise fail(at, f"step '{name}': {e}") from None
        except TypeError as e:
            raise fail(line, f"step '{name}': {e}") from None
        refs = {}
        for slot in ("a", "b", "c"):
            ref = raw.get(slot)
            if ref is None:
                continue
            ref_line = key_lines.get((i, slot), line)
            if not isinstance(ref, str):
                raise fail(ref_line, f"step '{name}': {slot} must be a string naming a model or an earlier step, "
                                     f"got {_show(ref)}.")
            if ref not in known:
                if ref in later and later[ref] >= i:
                    raise fail(ref_line, f"step '{name}' uses '{ref}', which is only made by a later step.")
                raise fail(ref_line, f"step '{name}': '{ref}' is neither a model in [models] nor an earlier step.")
            refs[slot] = ref
        if "a" not in refs or "b" not in refs:
            raise fail(line, f"step '{name}' needs both a and b.")
        if METHODS[options.method].needs_c and "c" not in refs:
            raise fail(line, f"step '{name}': {METHODS[options.method].label} needs c.")
        recipe.steps.append(Step(name, options, refs["a"], refs["b"], refs.get("c"), line,
                                 tuple(float(a) for a in alphas) if alphas is not None else None))
        known.add(name)
    return recipe


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _unsafe_name(file: str) -> str | None:
    """Why a recipe's file name could point outside the models folder (None: it cannot)."""
    if "\0" in file:
        return "contains a NUL byte"
    if not file.strip():
        return "is empty"
    if os.path.isabs(file) or file.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", file):
        return "is an absolute path"
    if ".." in re.split(r"[\\/]", file):
        return "goes up out of the folder ('..')"
    return None



def load_recipe(path: str | os.PathLike[str]) -> Recipe:
    """Read and check a recipe file; its folder is also searched for models named by sha256."""
    check_arguments("load_recipe", path=path)
    p = Path(path)
    try:
        with open(p, encoding="utf-8") as f:  # one character past the limit: a device or a huge file is not read
            text = f.read(MAX_TOML_CHARS + 1)
    except OSError as e:
        raise RecipeError(f"Cannot read recipe {p}: {e.strerror}.") from None
    except UnicodeDecodeError:
        raise RecipeError(f"Cannot read recipe {p}: it is not UTF-8 text (a recipe is a TOML file).") from None
    recipe = parse_recipe(text, p.name)
    recipe.folder = p.resolve().parent
    return recipe

