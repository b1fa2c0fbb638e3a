"""The tab's recipe builder as pure functions on the recipe text (gradio-free, unit-tested without a browser).

The builder's state is the canonical TOML text of `lib_rebasin.recipe.format` (one source of truth). Every button turns
(text, form values) into new text through `parse_recipe` and `Recipe.to_toml`, so whatever the builder makes is a
recipe the core accepts, and every refusal (a step that would use a later result, an unknown model, a bad value)
is the core's own message. A recipe being built may have no steps yet; `load` accepts that, `apply_text` (the
user's own text) does not.

In the step editor, A/B/C are chosen among the installed checkpoints (their titles) and the earlier steps
(`"[step] NAME"`); a model of a loaded recipe that is not installed shows as `"[model] NAME"`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import RebasinError
from ..io.parsing import parse_toml
from ..methods import ALL_PARAMS, METHODS
from ..options import OPTIONS, MergeOptions
from ..recipe.format import ModelRef, Recipe, RecipeError, Step, step_options
from ..recipe.from_output import recipe_from_checkpoint
from ..recipe.parse import parse_recipe
from .host import CheckpointEntry
from .recipe_refs import (
    MODEL_PREFIX,
    STEP_PREFIX,
    entry_for_model,
    find_entry,
    model_key,
    ref_for,
    ref_label,
    rel_file,
)

_PLACEHOLDER = "__rebasin_builder__"
DEFAULT_SETTINGS = {name: OPTIONS[name].default for name in ("precision", "device", "seed")}



@dataclass
class StepForm:
    """The step editor's values. a/b/c are dropdown values: checkpoint titles, "[step] X" or "[model] X"."""

    method: str = OPTIONS["method"].default
    a: str | None = None
    b: str | None = None
    c: str | None = None
    alpha: float = OPTIONS["alpha"].default
    iterations: int = OPTIONS["iterations"].default
    parts: tuple[str, ...] = OPTIONS["parts"].default
    name: str = ""


# -- text <-> Recipe -----------------------------------------------------------------------------------------------

def load(text: str | None, source: str = "recipe") -> Recipe:
    """Parse builder text; blank text or a recipe without steps gives a Recipe with no steps."""
    text = text or ""
    if not text.strip():
        return Recipe(name="my_recipe", defaults=dict(DEFAULT_SETTINGS))
    data = parse_toml(text, lambda why: RecipeError(f"{source}: {why}"))
    if data.get("step"):
        return parse_recipe(text, source)
    # No steps yet: parse with a throw-away model and step appended (line numbers of the text stay the same).
    extra = (f'\n[models.{_PLACEHOLDER}]\nfile = "{_PLACEHOLDER}"\n[[step]]\nname = "{_PLACEHOLDER}_step"\n'
             f'a = "{_PLACEHOLDER}"\nb = "{_PLACEHOLDER}"\nc = "{_PLACEHOLDER}"\n')
    recipe = parse_recipe(text + extra, source)
    recipe.models.pop(_PLACEHOLDER, None)
    recipe.steps = []
    return recipe


def dump(recipe: Recipe) -> str:
    return recipe.to_toml()


def apply_text(text: str) -> str:
    """The user's own text (the "Apply text" button): the core's strict parse, then the canonical text."""
    if not (text or "").strip():
        raise RebasinError("The recipe text is empty; add a step or load a recipe first.")
    return dump(parse_recipe(text, "recipe"))


def _check(recipe: Recipe) -> str:
    """Canonical text of an edited recipe, re-checked by the core (refuses forward references and the like)."""
    _prune_models(recipe)
    text = dump(recipe)
    return dump(load(text))


def _prune_models(recipe: Recipe) -> None:
    used = {r for s in recipe.steps for r in (s.a, s.b, s.c) if r is not None} | {recipe.bake_vae}
    for name in [m for m in recipe.models if m not in used]:
        recipe.models.pop(name)


def ref_choices(text: str, index: int | None, entries: list[CheckpointEntry], models_dir: Path | None = None
                ) -> list[str]:
    """A/B/C choices for step `index` (None = a new step at the end): earlier steps, recipe-only models, checkpoints."""
    recipe = load(text)
    n = len(recipe.steps) if index is None else max(0, min(index, len(recipe.steps)))
    out = [STEP_PREFIX + s.name for s in recipe.steps[:n]]
    out += [MODEL_PREFIX + m.name for m in recipe.models.values() if entry_for_model(m, entries, models_dir) is None]
    return out + [e.title for e in entries]


# -- builder operations (each: text in, canonical text out; RebasinError = refused, text unchanged) --------------

def _options(recipe: Recipe, form: StepForm, base: MergeOptions | None = None) -> MergeOptions:
    d = recipe.defaults
    parts = tuple(p for p in OPTIONS["parts"].choices if p in set(form.parts or ()))
    if not parts:
        raise RebasinError("Pick at least one part to merge (UNet, text encoder or VAE).")
    try:
        iterations = int(form.iterations)
        alpha = float(form.alpha)
    except (TypeError, ValueError):
        raise RebasinError("Alpha and iterations must be numbers.") from None
    opts = MergeOptions(method=form.method, alpha=alpha, iterations=iterations, parts=parts,
                        device=str(d.get("device", base.device if base else OPTIONS["device"].default)),
                        precision=str(d.get("precision", base.precision if base else OPTIONS["precision"].default)),
                        seed=int(d.get("seed", base.seed if base else OPTIONS["seed"].default)),
                        max_sweeps=int(base.max_sweeps if base else d.get("max_sweeps", OPTIONS["max_sweeps"].default)),
                        tolerance=float(base.tolerance if base else d.get("tolerance", OPTIONS["tolerance"].default)))
    opts = _with_extras(opts, d, base)
    opts.validate()
    return opts


def _with_extras(opts: MergeOptions, defaults: dict[str, Any], base: MergeOptions | None) -> MergeOptions:
    """Keep what the form has no field for (block weights, alignment, activation matching, REPAIR, method
    parameters): an edited step keeps its own, a new step gets the recipe's defaults."""
    kept = ("blocks", "align", "matching", "activation_samples", "repair", *ALL_PARAMS)
    names = ("blocks_preset", *kept)
    if base is not None:
        return replace(opts, **{n: getattr(base, n) for n in names})
    given = {k: defaults[k] for k in kept if k in defaults}
    if not given:
        return opts
    extras = step_options({**given, "alpha": opts.alpha})
    return replace(opts, **{n: getattr(extras, n) for n in names})


def _step_from_form(recipe: Recipe, form: StepForm, index: int, entries: list[CheckpointEntry],
                    models_dir: Path | None, base: Step | None = None) -> Step:
    if form.method not in METHODS:
        raise RebasinError(f"Unknown merge method '{form.method}'; choose one of {', '.join(METHODS)}.")
    opts = _options(recipe, form, base.options if base else None)
    a = ref_for(form.a, "A", recipe, index, entries, models_dir)
    b = ref_for(form.b, "B", recipe, index, entries, models_dir)
    if a is None or b is None:
        raise RebasinError("Pick model A and model B (an installed checkpoint or an earlier step).")
    c = None
    if METHODS[form.method].needs_c:
        c = ref_for(form.c, "C", recipe, index, entries, models_dir)
        if c is None:
            raise RebasinError(f"{METHODS[form.method].label} needs model C.")
    if len({a, b} | ({c} if c else set())) < (3 if c else 2):
        raise RebasinError("A step's models must all be different.")
    taken = set(recipe.models) | {s.name for i, s in enumerate(recipe.steps) if i != index}
    name = (form.name or "").strip() or (base.name if base else "")
    if not name:
        k = len(recipe.steps) + 1
        while f"step{k}" in taken:
            k += 1
        name = f"step{k}"
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise RebasinError(f"Step name '{name}': use letters, digits, '_', '-' or '.'.")
    if name in taken:
        raise RebasinError(f"The name '{name}' is already used by a model or another step.")
    return Step(name, opts, a, b, c)


def add_step(text: str, form: StepForm, entries: list[CheckpointEntry], models_dir: Path | None = None) -> str:
    recipe = load(text)
    step = _step_from_form(recipe, form, len(recipe.steps), entries, models_dir)
    recipe.steps.append(step)
    return _check(recipe)


def _index(recipe: Recipe, index: Any) -> int:
    try:
        i = int(index)
    except (TypeError, ValueError):
        raise RebasinError("Pick a step first.") from None
    if not 0 <= i < len(recipe.steps):
        raise RebasinError(f"There is no step {i + 1}; the recipe has {len(recipe.steps)} step(s).")
    return i


def update_step(text: str, index: int, form: StepForm, entries: list[CheckpointEntry],
                models_dir: Path | None = None) -> str:
    recipe = load(text)
    i = _index(recipe, index)
    old = recipe.steps[i]
    new = _step_from_form(recipe, form, i, entries, models_dir, base=old)
    recipe.steps[i] = new
    if new.name != old.name:  # later steps follow the rename
        for s in recipe.steps[i + 1:]:
            s.a, s.b = (new.name if r == old.name else r for r in (s.a, s.b))
            s.c = new.name if s.c == old.name else s.c
    return _check(recipe)


def remove_step(text: str, index: int) -> str:
    recipe = load(text)
    i = _index(recipe, index)
    gone = recipe.steps.pop(i)
    users = [s.name for s in recipe.steps[i:] if gone.name in (s.a, s.b, s.c)]
    if users:
        raise RebasinError(f"Step '{gone.name}' is used by step(s) {', '.join(users)}; change or remove those first.")
    return _check(recipe)


def move_step(text: str, index: int, delta: int) -> str:
    """Move a step up (delta=-1) or down (+1); the core refuses an order where a step uses a later result."""
    recipe = load(text)
    i = _index(recipe, index)
    j = i + int(delta)
    if not 0 <= j < len(recipe.steps):
        return dump(recipe)
    recipe.steps[i], recipe.steps[j] = recipe.steps[j], recipe.steps[i]
    return _check(recipe)


def set_settings(text: str, name: str | None = None, precision: str | None = None, device: str | None = None,
                 seed: int | None = None) -> str:
    """Recipe-wide name, precision, device and seed (written to [recipe] and to every step)."""
    recipe = load(text)
    if name is not None and str(name).strip():
        recipe.name = str(name).strip()
    new: dict[str, Any] = {k: v for k, v in (("precision", precision), ("device", device)) if v}
    if seed is not None and str(seed).strip() != "":
        try:
            new["seed"] = int(float(seed))
        except (TypeError, ValueError):
            raise RebasinError(f"Seed must be a whole number, got {seed!r}.") from None
    recipe.defaults.update(new)
    for s in recipe.steps:
        s.options = replace(s.options, **new)
        s.options.validate()
    return _check(recipe) if recipe.steps else dump(recipe)


def sync_settings(text: str, name: str | None, precision: str | None, device: str | None, seed: Any) -> str:
    """Apply the settings fields only where they differ from the recipe's (so that steps of a loaded recipe with
    their own seeds or devices keep them until the user changes the field)."""
    if not (text or "").strip() and not any(v not in (None, "") for v in (name, precision, device)):
        return text or ""
    cur = settings_of(text)
    changed: dict[str, Any] = {}
    for key, value in (("name", name), ("precision", precision), ("device", device)):
        if value not in (None, "") and str(value).strip() != str(cur[key]):
            changed[key] = str(value).strip()
    if seed not in (None, "") and int(float(seed)) != cur["seed"]:
        changed["seed"] = int(float(seed))
    if not changed and (text or "").strip():
        return text
    return set_settings(text, **changed)


NO_VAE = "None"


def set_bake_vae(text: str, choice: str | None, vaes: list[CheckpointEntry], entries: list[CheckpointEntry],
                 models_dir: Path | None = None) -> str:
    """Bake `choice` (a title from the host's VAE list, else a checkpoint; NO_VAE or empty: none) into the recipe's
    output: `bake_vae` names a [models] entry for that file (reused when the file is already a model)."""
    recipe = load(text)
    if not choice or choice == NO_VAE:
        recipe.bake_vae = None
    else:
        entry = find_entry(choice, vaes) or find_entry(choice, entries)
        if entry is None:
            raise RebasinError(f"VAE to bake in '{choice}' is neither in the VAE list nor a checkpoint; press refresh "
                               "and pick it again.")
        file = rel_file(entry, models_dir) if entry in entries else entry.path.name
        name = next((n for n, m in recipe.models.items() if m.file in (file, entry.path.name)), None)
        if name is None:
            name = model_key(entry.path.stem, recipe.models)
            recipe.models[name] = ModelRef(name, file=file)
        recipe.bake_vae = name
    if recipe.steps:
        return _check(recipe)  # also drops the model of a VAE no longer baked in
    _prune_models(recipe)
    return dump(recipe)


def bake_vae_of(text: str) -> str | None:
    """The file the recipe bakes in (for the dropdown), or None."""
    try:
        recipe = load(text)
    except RebasinError:
        return None
    if recipe.bake_vae is None:
        return None
    m = recipe.models[recipe.bake_vae]
    return Path(m.file).name if m.file else m.sha256


def settings_of(text: str) -> dict[str, Any]:
    recipe = load(text)
    d = {**DEFAULT_SETTINGS, **recipe.defaults}
    if recipe.steps:  # the canonical text writes them per step; show the first step's
        o = recipe.steps[0].options
        d.update(precision=o.precision, device=o.device, seed=o.seed)
    return {"name": recipe.name, "precision": d["precision"], "device": d["device"], "seed": int(d["seed"])}


def step_form(text: str, index: int, entries: list[CheckpointEntry], models_dir: Path | None = None) -> StepForm:
    """The editor's values for step `index` (to edit it)."""
    recipe = load(text)
    s = recipe.steps[_index(recipe, index)]
    o = s.options
    return StepForm(method=o.method, a=ref_label(s.a, recipe, entries, models_dir),
                    b=ref_label(s.b, recipe, entries, models_dir), c=ref_label(s.c, recipe, entries, models_dir),
                    alpha=float(o.alpha), iterations=int(o.iterations), parts=tuple(o.parts), name=s.name)


def step_labels(text: str) -> list[str]:
    """Choices for the "step to edit" selector: "1. name"."""
    try:
        recipe = load(text)
    except RebasinError:
        return []
    return [f"{i + 1}. {s.name}" for i, s in enumerate(recipe.steps)]


def step_name(text: str, index: int) -> str | None:
    """The name of step `index` (0-based), or None when the text has no such step."""
    try:
        steps = load(text).steps
    except RebasinError:
        return None
    return steps[index].name if 0 <= index < len(steps) else None


def label_index(label: str | None) -> int | None:
    m = re.match(r"\s*(\d+)\.", str(label or ""))
    return int(m.group(1)) - 1 if m else None


def recipe_markdown(text: str) -> str:
    """The chain in words, for the builder's overview."""
    try:
        recipe = load(text)
    except RebasinError as e:
        return f"(the text does not parse: {e})"
    if not recipe.steps:
        return "*No steps yet: pick models and settings below and press **Add step**.*"
    def show(ref: str | None) -> str:
        if ref in recipe.models:
            m = recipe.models[ref]
            return f"`{m.file or m.sha256}`"
        return f"step **{ref}**"

    lines = [f"**{recipe.name}**: {len(recipe.steps)} step(s); the last one is saved"
             + (f", with the VAE of {show(recipe.bake_vae)} baked in." if recipe.bake_vae else ".")]
    for i, s in enumerate(recipe.steps):
        o = s.options
        label = METHODS[o.method].label
        ins = f"A = {show(s.a)}, B = {show(s.b)}" + (f", C = {show(s.c)}" if s.c else "")
        extra = f", {o.iterations} iteration(s)" if METHODS[o.method].iterates else ""
        lines.append(f"{i + 1}. **{s.name}**: {label}, alpha {o.alpha:g}{extra}, parts {'+'.join(o.parts)}; {ins}")
    return "\n".join(lines)


def from_checkpoint(path: str | Path) -> str:
    """The recipe stored in a checkpoint's metadata, as canonical builder text (RecipeError if it has none)."""
    text = recipe_from_checkpoint(path)
    return dump(parse_recipe(text, Path(path).name))
