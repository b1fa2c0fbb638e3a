"""Reading a recipe back from an output's metadata (`recipe --from`): a recipe run's own text, with the folders
its inputs were read from, or a single merge's record turned into a one-step recipe."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..arguments import check_arguments
from ..errors import RebasinError
from ..io.checkpoint import open_checkpoint
from ..io.parsing import json_or_none, parse_json
from ..options import OPTIONS, MergeOptions
from .format import ModelRef, Recipe, RecipeError, Step
from .parse import parse_recipe


def recipe_from_checkpoint(path: str | os.PathLike[str]) -> str:
    """The recipe text stored in a checkpoint's metadata (a recipe run, or a single merge made by this tool)."""
    check_arguments("recipe_from_checkpoint", path=path)
    with open_checkpoint(path) as ck:
        meta = ck.metadata
    name = Path(path).name
    raw = meta.get("lib_rebasin")
    ours = parse_json(raw, lambda why: RecipeError(f"{name}: its 'lib_rebasin' metadata is {why}; no recipe can "
                                                   "be made from it.")) if raw else None
    if not isinstance(ours, dict):
        raise RecipeError(f"{Path(path).name} was not made by lib_rebasin (no 'lib_rebasin' metadata).")
    if "recipe_toml" in ours:
        return _with_folders(str(ours["recipe_toml"]), ours.get("inputs"), path)
    single = ours.get("recipe")
    webui = json_or_none(meta.get("sd_merge_recipe")) or {}
    if not isinstance(single, dict):
        raise RecipeError(f"{Path(path).name}: its lib_rebasin metadata holds no recipe.")
    try:
        return _single_merge_recipe(Path(path).stem, single, webui)
    except (KeyError, TypeError, ValueError, AttributeError, RebasinError):
        raise RecipeError(f"{Path(path).name}: its lib_rebasin metadata is incomplete or damaged; no recipe can be "
                          "made from it.") from None


# What a single merge's record means when it lacks a key: outputs made before `tolerance` existed used the paper's
# rule (0). Every option recorded always (no `recorded_when`) and not added since must be there.
_RECORDED_SINCE: dict[str, Any] = {"tolerance": 0.0}
_ALWAYS_RECORDED = [o.name for o in OPTIONS.values()
                    if o.user_input and o.recorded_when is None and o.name not in _RECORDED_SINCE]


def _single_merge_recipe(stem: str, single: dict[str, Any], webui: Any) -> str:
    models = single.get("models", {})
    hashes = {"A": webui.get("primary_model_hash"), "B": webui.get("secondary_model_hash"),
              "C": webui.get("tertiary_model_hash")}
    folders = single.get("folders", {})
    refs = {label.lower(): ModelRef(label.lower(), file, hashes.get(label), folder=folders.get(label))
            for label, file in models.items()}
    for name in _ALWAYS_RECORDED:
        single[name]
    settings = {**_RECORDED_SINCE, **{o.name: single[o.name] for o in OPTIONS.values()
                                      if o.user_input and o.name != "blocks" and o.name in single}}
    opts = MergeOptions(**{k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()})
    if single.get("blocks") is not None:
        opts = opts.with_blocks(tuple(single["blocks"]), single.get("blocks_preset"))
    opts.validate()
    step = Step("merge", opts, "a", "b", "c" if "c" in refs else None)
    baked = single.get("bake_vae")
    bake_name = None
    if isinstance(baked, dict) and isinstance(baked.get("file"), str):
        bake_name = "vae"
        folder = baked.get("folder")
        refs[bake_name] = ModelRef(bake_name, baked["file"], baked.get("sha256"),
                                   folder=folder if isinstance(folder, str) else None)
    return Recipe(name=stem, models=refs, steps=[step], bake_vae=bake_name).to_toml()


def _with_folders(text: str, inputs: Any, source: str | os.PathLike[str]) -> str:
    """A recorded recipe with the folders its inputs were read from (so running it finds them by sha256)."""
    if not isinstance(inputs, dict):
        return text
    try:
        recipe = parse_recipe(text, Path(source).name)
    except RecipeError:
        return text
    for name, ref in recipe.models.items():
        entry = inputs.get(name)
        if isinstance(entry, dict) and isinstance(entry.get("folder"), str) and os.path.isabs(entry["folder"]):
            ref.folder = entry["folder"]
    return recipe.to_toml()

