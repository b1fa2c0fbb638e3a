"""Running a recipe: every step in one process, only the last one written (atomically), or, `recipe_in_memory`,
the last one kept in memory too (what its file would hold, for a replay compared with an earlier result).

Intermediate results stay in memory (only while a later step still needs them), and each is exactly the tensors
that saving that step to a file would give, so a chain equals running the steps one by one with intermediate files,
bit for bit.

The output's metadata carries the canonical recipe text with every input's sha256, so `recipe --from OUT` gives
back a recipe that re-runs to the same bytes (`from_output.py`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from .. import __version__
from ..arguments import check_arguments
from ..io.checkpoint import Checkpoint, open_checkpoint
from ..io.model_input import legacy_hash, open_model, same_file
from ..io.output_file import check_output_path, output_bytes
from ..io.parsing import json_or_none
from ..io.precisions import PRECISIONS
from ..merge.diagnostics import Diagnostics, stored_diagnostics
from ..merge.held import HeldMerge, merge_held
from ..merge.preflight import output_entries
from ..merge.run import MergeResult, merge_checkpoints, merge_in_memory
from ..merge.sweep import check_room, is_sweep, sweep_checkpoints, sweep_outputs
from ..parts import part_of
from ..progress import CancelCheck, ProgressCallback, Reporter
from .format import ModelRef, Recipe, RecipeError, Step
from .provenance import hash_progress
from .resolve import resolve_models


@dataclass
class RecipeResult:
    output: Path
    steps: list[tuple[str, Diagnostics]]
    metadata: dict[str, str]
    # A sweep's last step (alpha a list): every file written, in the order of the values (`output` is the last),
    # and each one's result.
    outputs: list[MergeResult] = field(default_factory=list)

    def summary_lines(self) -> list[str]:
        out = []
        for name, d in self.steps:
            out.append(f"Step {name}:")
            out += [f"  {line}" for line in d.summary_lines()]
        return out


def run_recipe(recipe: Recipe, models_dir: Path, output: str | os.PathLike[str], overwrite: bool = False,
               progress: ProgressCallback | None = None, cancel: CancelCheck | None = None,
               extra_metadata: dict[str, str] | None = None, confine: bool = True,
               vae_dir: Path | None = None, on_commit: Callable[[Path], None] | None = None,
               on_written: Callable[[MergeResult], None] | None = None) -> RecipeResult:
    """Run every step; only the last one is written (atomically). Raises RebasinError; no file then.

    A last step whose alpha is a list is a sweep (merge/sweep.py): `output` is then a template with {alpha}, the
    earlier steps run once, and each value's file records (and re-runs to) the recipe with that one value;
    `on_written(result)` follows each file.

    `confine`: model names must resolve inside `models_dir` (see `resolve_models`); `vae_dir`: where the VAE to
    bake in is looked for first. The last step's commit (`merge_checkpoints`, `on_commit`) is the recipe's only
    one: earlier steps stay in memory, so a cancel before it leaves no file and one after it changes nothing."""
    check_arguments("run_recipe", ("vae_dir",), recipe=recipe, models_dir=models_dir, output=output,
                    overwrite=overwrite, progress=progress, cancel=cancel, extra_metadata=extra_metadata,
                    confine=confine, vae_dir=vae_dir)
    last = recipe.steps[-1]
    alphas = last.alphas or ((last.options.alpha,) if is_sweep([last.options.alpha], output) else None)
    outputs = sweep_outputs(output, alphas, overwrite) if alphas is not None else [check_output_path(output,
                                                                                                      overwrite)]
    if alphas is not None:
        recipe = replace(recipe, steps=[*recipe.steps[:-1], replace(last, alphas=tuple(alphas))])
    paths = resolve_models(recipe, models_dir, confine, vae_dir, Reporter(progress, cancel))
    # Every input is read, and hashed, through one open file for the whole chain: an input replaced meanwhile
    # cannot get its new hash recorded for the old bytes, nor give two steps two different versions.
    opened = _open_inputs(paths)
    try:
        return _run_opened(recipe, paths, opened, outputs, overwrite, progress, cancel, extra_metadata, on_commit,
                           on_written)
    finally:
        for ck in set(opened.values()):
            ck.close()


def _open_inputs(paths: dict[str, Path]) -> dict[str, Checkpoint]:
    opened: dict[str, Checkpoint] = {}
    try:
        for name, p in paths.items():
            same = next((ck for ck in opened.values() if same_file(ck, p)), None)
            opened[name] = same or open_checkpoint(p)  # one file under two names stays one source
    except BaseException:
        for ck in set(opened.values()):
            ck.close()
        raise
    return opened


def _run_opened(recipe: Recipe, paths: dict[str, Path], opened: dict[str, Checkpoint], outputs: list[Path],
                overwrite: bool, progress: ProgressCallback | None, cancel: CancelCheck | None,
                extra_metadata: dict[str, str] | None, on_commit: Callable[[Path], None] | None,
                on_written: Callable[[MergeResult], None] | None) -> RecipeResult:
    check_room(outputs, _checked_output_bytes(recipe, opened))
    chain = _run_earlier_steps(recipe, paths, opened, progress, cancel)
    step = recipe.steps[-1]
    if step.alphas is not None:
        return _sweep_step(chain.canonical, step, chain.a, chain.b, chain.c, outputs, overwrite, chain.progress,
                           cancel, extra_metadata, on_commit, on_written, paths, opened, chain.inputs, chain.done)
    res: MergeResult = merge_checkpoints(chain.a, chain.b, outputs[0], step.options, c=chain.c,
                                         overwrite=overwrite, progress=chain.progress, cancel=cancel,
                                         extra_metadata=extra_metadata,
                                         metadata_hook=chain.metadata_hook(step, paths, opened),
                                         bake_vae=opened[recipe.bake_vae] if recipe.bake_vae is not None else None,
                                         on_commit=on_commit)
    return RecipeResult(res.output, [*chain.done, (step.name, res.diagnostics)], res.metadata)


def recipe_in_memory(recipe: Recipe, models_dir: Path, progress: ProgressCallback | None = None,
                     cancel: CancelCheck | None = None, extra_metadata: dict[str, str] | None = None,
                     confine: bool = True, vae_dir: Path | None = None) -> HeldMerge:
    """What `run_recipe(recipe, models_dir, <file>, ...)` writes, kept in memory and nothing written: the last
    step's tensors in the file's order and the metadata the file would end with, the recipe's record included
    (`merge/held.py`'s `HeldMerge`, which `save_held` writes as that very file). The same checks before any work,
    the same steps; a last step whose alpha is a list (a sweep, several files) is refused."""
    check_arguments("recipe_in_memory", ("vae_dir",), recipe=recipe, models_dir=models_dir, progress=progress,
                    cancel=cancel, extra_metadata=extra_metadata, confine=confine, vae_dir=vae_dir)
    step = recipe.steps[-1]
    if step.alphas is not None:
        raise RecipeError(f"recipe_in_memory: step {step.name!r}'s alpha is a list (a sweep, one file per value); "
                          "run it with run_recipe.")
    paths = resolve_models(recipe, models_dir, confine, vae_dir, Reporter(progress, cancel))
    opened = _open_inputs(paths)
    try:
        _checked_output_bytes(recipe, opened)
        chain = _run_earlier_steps(recipe, paths, opened, progress, cancel)
        return merge_held(chain.a, chain.b, step.options, c=chain.c, report=Reporter(chain.progress, cancel),
                          extra_metadata=extra_metadata, metadata_hook=chain.metadata_hook(step, paths, opened),
                          bake_vae=opened[recipe.bake_vae] if recipe.bake_vae is not None else None)
    finally:
        for ck in set(opened.values()):
            ck.close()


def _checked_output_bytes(recipe: Recipe, opened: dict[str, Checkpoint]) -> int:
    """Every step's inputs checked from the headers before any work (architectures, shapes, parts), and the VAE to
    bake against the output's architecture; the bytes of the output file."""
    for step in recipe.steps:
        for slot in ("a", "b", "c"):
            ref = getattr(step, slot)
            if ref in opened:
                open_model(opened[ref], slot.upper()).close()
    first = open_model(opened[recipe.output_root()], "A")
    try:
        out_dtype = PRECISIONS[recipe.steps[-1].options.precision]
        baked_extra = 0
        if recipe.bake_vae is not None:
            from ..merge.vae_bake import open_vae

            # Checked against the output's architecture before any work; the same open file is baked in later.
            open_vae(opened[recipe.bake_vae], first.spec).close()
            # A baked VAE's keys that A lacks are added to the output, in the output's precision.
            baked_extra = sum(out_dtype.itemsize * math.prod(s) for k, s in first.spec.shapes.items()
                              if part_of(k) == "vae" and k not in first.ckpt.infos)
        return baked_extra + output_bytes(output_entries(first, out_dtype))
    finally:
        first.close()


@dataclass
class _Chain:
    """A recipe with its earlier steps run (held in memory): what its last step merges, and what it records."""

    canonical: Recipe
    inputs: dict[str, dict[str, str | None]]
    done: list[tuple[str, Diagnostics]]
    a: Checkpoint
    b: Checkpoint
    c: Checkpoint | None
    progress: ProgressCallback  # the last step's share of the chain's bar

    def metadata_hook(self, step: Step, paths: dict[str, Path], opened: dict[str, Checkpoint]
                      ) -> Callable[[Diagnostics], dict[str, str]]:
        """The last step's metadata: the whole chain's recipe and provenance."""
        def hook(diag: Diagnostics) -> dict[str, str]:
            return _recipe_metadata(self.canonical, paths, opened, self.inputs, [*self.done, (step.name, diag)])

        return hook


def _run_earlier_steps(recipe: Recipe, paths: dict[str, Path], opened: dict[str, Checkpoint],
                       progress: ProgressCallback | None, cancel: CancelCheck | None) -> _Chain:
    """Every step but the last, each in memory (freed once no later step needs it), with the chain's progress."""
    canonical = _canonical(recipe, paths, opened, Reporter(progress, cancel))
    last_use = {}
    for i, step in enumerate(recipe.steps):
        for ref in (step.a, step.b, step.c):
            if ref is not None:
                last_use[ref] = i
    results: dict[str, Checkpoint] = {}
    done: list[tuple[str, Diagnostics]] = []
    n = len(recipe.steps)
    inputs = {name: {"file": p.name, "sha256": canonical.models[name].sha256, "folder": str(p.parent.resolve())}
              for name, p in paths.items()}

    # One bar and one ETA for the whole chain: each step's own 0..1 fills its share.
    chain = Reporter(progress, None)
    for i, step in enumerate(recipe.steps):
        step_progress = chain.relay(i / n, (i + 1) / n, f"step {i + 1}/{n} ({step.name})")
        a_src, b_src = (results.get(r) or opened[r] for r in (step.a, step.b))
        c_src = results.get(step.c) or opened[step.c] if step.c is not None else None
        if i == n - 1:
            return _Chain(canonical, inputs, done, a_src, b_src, c_src, step_progress)
        ckpt, diag = merge_in_memory(a_src, b_src, step.options, c=c_src, report=Reporter(step_progress, cancel),
                                     name=step.name)
        results[step.name] = ckpt
        done.append((step.name, diag))
        for name in [r for r, last in last_use.items() if last <= i and r in results]:
            results.pop(name).close()  # no later step needs it: free the memory now
    raise AssertionError("unreachable")


def _sweep_step(canonical: Recipe, step: Step, a_src: Checkpoint, b_src: Checkpoint, c_src: Checkpoint | None,
                outputs: list[Path], overwrite: bool, progress: ProgressCallback, cancel: CancelCheck | None,
                extra_metadata: dict[str, str] | None, on_commit: Callable[[Path], None] | None,
                on_written: Callable[[MergeResult], None] | None, paths: dict[str, Path],
                opened: dict[str, Checkpoint], inputs: dict[str, dict[str, str | None]],
                done: list[tuple[str, Diagnostics]]) -> RecipeResult:
    """The last step at each of its alphas: each file records the recipe with that one value."""
    assert step.alphas is not None
    recipes = dict(zip(step.alphas, canonical.candidates(), strict=True))

    def metadata_hook(diag: Diagnostics) -> dict[str, str]:
        return _recipe_metadata(recipes[diag.alpha], paths, opened, inputs, [*done, (step.name, diag)])

    results = sweep_checkpoints(a_src, b_src, outputs, step.options, step.alphas, c=c_src, overwrite=overwrite,
                                progress=progress, cancel=cancel, extra_metadata=extra_metadata,
                                bake_vae=(opened[canonical.bake_vae] if canonical.bake_vae is not None else None),
                                on_commit=on_commit, on_written=on_written, metadata_hook=metadata_hook)
    return RecipeResult(results[-1].output, [*done, (step.name, results[-1].diagnostics)], results[-1].metadata,
                        results)


def _canonical(recipe: Recipe, paths: dict[str, Path], opened: dict[str, Checkpoint], report: Reporter) -> Recipe:
    """The recipe with every model pinned to its file name and full sha256 (of the open file that is merged)."""
    models = {name: ModelRef(name, paths[name].name,
                             opened[name].sha256(hash_progress(report, paths[name].name, 0.0, 0.0)), ref.line)
              for name, ref in recipe.models.items()}
    return replace(recipe, models=models)


def _recipe_metadata(recipe: Recipe, paths: dict[str, Path], opened: dict[str, Checkpoint],
                     inputs: dict[str, dict[str, str | None]], steps: list[tuple[str, Diagnostics]]) -> dict[str, str]:
    text = recipe.to_toml()
    merge_models: dict[str, object] = {}
    for name, p in paths.items():
        sha = inputs[name]["sha256"]
        ck = opened[name]
        ck.verify_unchanged()  # the hashes above are of the bytes merged only if nothing changed since
        own = ck.metadata.get("sd_merge_recipe")
        history = ck.metadata.get("sd_merge_models")
        merge_models[str(sha)] = {"name": p.stem, "legacy_hash": legacy_hash(ck),
                                  "sd_merge_recipe": json_or_none(own)}
        if history:
            parsed = json_or_none(history)
            if isinstance(parsed, dict):
                merge_models.update(parsed)
    recipe_meta = {"type": "lib_rebasin_recipe", "version": __version__, "name": recipe.name, "recipe": text,
                   "models": inputs}
    ours = {"version": __version__, "recipe_toml": text, "inputs": inputs,
            "steps": [{"name": n, "diagnostics": stored_diagnostics(d)} for n, d in steps]}
    return {"sd_merge_recipe": json.dumps(recipe_meta), "sd_merge_models": json.dumps(merge_models),
            "lib_rebasin": json.dumps(ours)}

