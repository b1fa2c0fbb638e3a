"""Model references of the tab's recipe builder: which dropdown value stands for which recipe name.

In the step editor, A/B/C are chosen among the installed checkpoints (their titles) and the earlier steps
(`"[step] NAME"`); a model of a loaded recipe that is not installed shows as `"[model] NAME"`. A checkpoint is
written into the recipe as its path relative to the checkpoint folder (its file name where it lies elsewhere).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from ..errors import RebasinError
from ..recipe.format import ModelRef, Recipe
from .host import CheckpointEntry

STEP_PREFIX = "[step] "
MODEL_PREFIX = "[model] "

def rel_file(entry: CheckpointEntry, models_dir: Path | None) -> str:
    if models_dir is not None:
        try:
            return entry.path.resolve().relative_to(Path(models_dir).resolve()).as_posix()
        except ValueError:
            return entry.path.name  # outside the checkpoint folder (another --ckpt-dir): the tab finds it by name
    return entry.path.name


def model_key(stem: str, taken: Iterable[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_]+", "_", stem).strip("_").lower() or "model"
    if base[0].isdigit():
        base = "m_" + base
    taken = set(taken)
    key, n = base, 2
    while key in taken:
        key, n = f"{base}_{n}", n + 1
    return key


def find_entry(ref: str, entries: list[CheckpointEntry]) -> CheckpointEntry | None:
    stripped = re.sub(r"\s*\[[0-9a-fA-F]+\]\s*$", "", ref)
    for test in (lambda e: e.title == ref, lambda e: re.sub(r"\s*\[[0-9a-fA-F]+\]\s*$", "", e.title) == stripped):
        hits = [e for e in entries if test(e)]
        if hits:
            return hits[0]
    return None


def entry_for_model(ref: ModelRef, entries: list[CheckpointEntry], models_dir: Path | None) -> CheckpointEntry | None:
    if not ref.file:
        return None
    for e in entries:
        if rel_file(e, models_dir) == ref.file or str(e.path) == ref.file:
            return e
    for e in entries:
        if e.path.name == Path(ref.file).name:
            return e
    return None


def ref_for(choice: str | None, slot: str, recipe: Recipe, index: int, entries: list[CheckpointEntry],
             models_dir: Path | None) -> str | None:
    """A dropdown value -> the recipe name it stands for (adding a [models] entry for a checkpoint)."""
    if choice is None or not str(choice).strip():
        return None
    choice = str(choice).strip()
    if choice.startswith(STEP_PREFIX):
        name = choice[len(STEP_PREFIX):]
        earlier = [s.name for s in recipe.steps[:index]]
        if name not in earlier:
            raise RebasinError(f"Model {slot}: step '{name}' is not an earlier step; a step can only use the "
                               f"results of the steps above it.")
        return name
    if choice.startswith(MODEL_PREFIX):
        name = choice[len(MODEL_PREFIX):]
        if name not in recipe.models:
            raise RebasinError(f"Model {slot}: '{name}' is not a model of this recipe.")
        return name
    entry = find_entry(choice, entries)
    if entry is None:
        raise RebasinError(f"Model {slot} '{choice}' is not in the checkpoint list; press refresh and pick it again.")
    rel = rel_file(entry, models_dir)
    for m in recipe.models.values():
        if m.file == rel:
            return m.name
    key = model_key(entry.path.stem, set(recipe.models) | {s.name for s in recipe.steps})
    recipe.models[key] = ModelRef(key, file=rel)
    return key


def ref_label(ref: str | None, recipe: Recipe, entries: list[CheckpointEntry], models_dir: Path | None) -> str | None:
    """The dropdown value that shows recipe name `ref`."""
    if ref is None:
        return None
    if ref in recipe.models:
        e = entry_for_model(recipe.models[ref], entries, models_dir)
        return e.title if e is not None else MODEL_PREFIX + ref
    return STEP_PREFIX + ref
