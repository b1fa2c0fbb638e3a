"""Every public function, called with a wrong argument, raises a RebasinError with one line naming it.

None for a file, a string for the options, a number for a callback, a misspelt option, a value beyond a float's
range: each is our own error, before any work, and writes nothing; never an AssertionError, TypeError,
AttributeError, KeyError, ValueError or OverflowError from inside. Run against real files (the mini checkpoints).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import pytest

from lib_rebasin import demo
from lib_rebasin.io import describe as inspect
from lib_rebasin.merge import legacy
from lib_rebasin.recipe.format import step_options
from lib_rebasin.recipe.from_output import recipe_from_checkpoint
from lib_rebasin.recipe.parse import load_recipe, parse_recipe
from lib_rebasin.recipe.resolve import resolve_models
from lib_rebasin.recipe.run import recipe_in_memory, run_recipe
from lib_rebasin.sd1 import synthetic
from lib_rebasin.merge.blend import telescoping_schedule
from lib_rebasin.merge.block_weights import parse_blocks
from lib_rebasin.errors import RebasinError
from lib_rebasin.options import MergeOptions
from lib_rebasin.progress import Reporter
from lib_rebasin.merge.run import merge_checkpoints, merge_in_memory
from lib_rebasin.merge.preflight import preflight

WS = MergeOptions(method="weighted_sum")
STEP = '[models]\na = "a.safetensors"\nb = "b.safetensors"\n[[step]]\na = "a"\nb = "b"\nmethod = "weighted_sum"\n'


@pytest.fixture(scope="module")
def models(tiny_models: dict[str, Path]) -> dict[str, Path]:
    """Tiny models in place of the mini ones: what is tested is argument checking, not the spec."""
    return tiny_models


class Files:
    """The real inputs of one test: A and B, an output name in an empty folder, a recipe over A and B."""

    def __init__(self, models: dict[str, Path], tmp: Path) -> None:
        self.a, self.b = models["a"], models["finetune"]
        self.models = self.a.parent
        self.out_dir = tmp / "out"
        self.out_dir.mkdir()
        self.out = self.out_dir / "m.safetensors"
        self.recipe = parse_recipe(STEP.replace("b.safetensors", self.b.name), "r.toml")
        self.file = tmp / "a_file.txt"
        self.file.write_text("not a folder")


Call = Callable[[Files], Any]
CASES: dict[str, tuple[Call, str]] = {
    # merge_checkpoints: the example first
    "merge_checkpoints output None": (lambda f: merge_checkpoints(f.a, f.b, None, WS), "output"),
    "merge_checkpoints output bytes": (lambda f: merge_checkpoints(f.a, f.b, bytes(f.out), WS), "output"),
    "merge_checkpoints a None": (lambda f: merge_checkpoints(None, f.b, f.out, WS), "model A"),
    "merge_checkpoints b int": (lambda f: merge_checkpoints(f.a, 3, f.out, WS), "model B"),
    "merge_checkpoints c list": (lambda f: merge_checkpoints(f.a, f.b, f.out, MergeOptions(method="add_difference"),
                                                             c=[f.a]), "model C"),
    "merge_checkpoints b missing": (lambda f: merge_checkpoints(f.a, f.models / "nope.safetensors", f.out, WS),
                                    "nope.safetensors"),
    "merge_checkpoints options str": (lambda f: merge_checkpoints(f.a, f.b, f.out, "rebasin"), "options"),
    "merge_checkpoints options None": (lambda f: merge_checkpoints(f.a, f.b, f.out, None), "options"),
    "merge_checkpoints overwrite str": (lambda f: merge_checkpoints(f.a, f.b, f.out, WS, overwrite="no"),
                                        "overwrite"),
    "merge_checkpoints progress int": (lambda f: merge_checkpoints(f.a, f.b, f.out, WS, progress=5), "progress"),
    "merge_checkpoints cancel str": (lambda f: merge_checkpoints(f.a, f.b, f.out, WS, cancel="stop"), "cancel"),
    "merge_checkpoints extra_metadata int value": (lambda f: merge_checkpoints(f.a, f.b, f.out, WS,
                                                                               extra_metadata={"k": 1}),
                                                   "extra_metadata"),
    "merge_checkpoints metadata_hook dict": (lambda f: merge_checkpoints(f.a, f.b, f.out, WS, metadata_hook={}),
                                             "metadata_hook"),
    "merge_checkpoints bake_vae int": (lambda f: merge_checkpoints(f.a, f.b, f.out, WS, bake_vae=1), "bake_vae"),
    # merge_in_memory, preflight
    "merge_in_memory a None": (lambda f: merge_in_memory(None, f.b, WS), "model A"),
    "merge_in_memory options dict": (lambda f: merge_in_memory(f.a, f.b, {"method": "weighted_sum"}), "options"),
    "merge_in_memory report int": (lambda f: merge_in_memory(f.a, f.b, WS, report=3), "report"),
    "merge_in_memory name int": (lambda f: merge_in_memory(f.a, f.b, WS, name=3), "name"),
    "preflight options None": (lambda f: preflight(f.a, f.b, f.out, None), "options"),
    "preflight output list": (lambda f: preflight(f.a, f.b, [f.out], WS), "output"),
    # MergeOptions: construction, then the values merge_checkpoints validates
    "MergeOptions misspelt": (lambda f: MergeOptions(alpah=0.3), "did you mean 'alpha'"),
    "MergeOptions too many positional": (lambda f: MergeOptions(*range(30)), "by position"),
    "MergeOptions positional and named": (lambda f: MergeOptions("rebasin", method="rebasin"), "method"),
    "MergeOptions blocks int": (lambda f: merge_checkpoints(f.a, f.b, f.out, MergeOptions(blocks=5)), "blocks"),
    "MergeOptions blocks beyond float": (lambda f: merge_checkpoints(
        f.a, f.b, f.out, MergeOptions(method="weighted_sum", blocks=(10**400,) * 26)), "BASE"),
    "MergeOptions blocks_preset int": (lambda f: merge_checkpoints(
        f.a, f.b, f.out, MergeOptions(method="weighted_sum", blocks=(0.5,) * 26, blocks_preset=5)), "blocks_preset"),
    "MergeOptions alpha beyond float": (lambda f: merge_checkpoints(f.a, f.b, f.out, MergeOptions(alpha=10**400)),
                                        "alpha"),
    "MergeOptions seed of 5000 digits": (lambda f: merge_checkpoints(f.a, f.b, f.out, MergeOptions(seed=10**5000)),
                                         "seed"),
    "MergeOptions ties_density beyond float": (lambda f: merge_checkpoints(
        f.a, f.b, f.out, MergeOptions(method="ties", ties_density=10**400)), "ties_density"),
    "MergeOptions device gpu": (lambda f: merge_checkpoints(f.a, f.b, f.out, MergeOptions(device="cudax")),
                                "device"),
    # recipes
    "parse_recipe None": (lambda f: parse_recipe(None), "text"),
    "parse_recipe bytes": (lambda f: parse_recipe(STEP.encode()), "text"),
    "parse_recipe source int": (lambda f: parse_recipe(STEP, 5), "source"),
    "load_recipe None": (lambda f: load_recipe(None), "path"),
    "load_recipe folder": (lambda f: load_recipe(f.models), "Cannot read recipe"),
    "step_options None": (lambda f: step_options(None), "settings"),
    "step_options misspelt": (lambda f: step_options({"alpah": 0.5}), "alpah"),
    "run_recipe recipe None": (lambda f: run_recipe(None, f.models, f.out), "recipe"),
    "run_recipe recipe text": (lambda f: run_recipe(STEP, f.models, f.out), "recipe"),
    "run_recipe models_dir None": (lambda f: run_recipe(f.recipe, None, f.out), "models_dir"),
    "run_recipe output None": (lambda f: run_recipe(f.recipe, f.models, None), "output"),
    "run_recipe overwrite str": (lambda f: run_recipe(f.recipe, f.models, f.out, overwrite="yes"),
                                 "overwrite"),
    "run_recipe progress int": (lambda f: run_recipe(f.recipe, f.models, f.out, progress=1), "progress"),
    "recipe_in_memory recipe text": (lambda f: recipe_in_memory(STEP, f.models), "recipe"),
    "recipe_in_memory models_dir None": (lambda f: recipe_in_memory(f.recipe, None), "models_dir"),
    "recipe_in_memory cancel int": (lambda f: recipe_in_memory(f.recipe, f.models, cancel=1), "cancel"),
    "resolve_models models_dir int": (lambda f: resolve_models(f.recipe, 5), "models_dir"),
    "recipe_from_checkpoint None": (lambda f: recipe_from_checkpoint(None), "path"),
    "recipe_from_checkpoint missing": (lambda f: recipe_from_checkpoint(f.models / "nope.safetensors"),
                                       "nope.safetensors"),
    # inspect, the synthetic models, the demo, block weights, legacy mode
    "inspect_checkpoint None": (lambda f: inspect.inspect_checkpoint(None), "path"),
    "inspect_checkpoint int": (lambda f: inspect.inspect_checkpoint(3), "path"),
    "make_checkpoint path None": (lambda f: synthetic.make_checkpoint(None), "path"),
    "make_checkpoint config": (lambda f: synthetic.make_checkpoint(f.out, "huge"), "config"),
    "make_checkpoint precision": (lambda f: synthetic.make_checkpoint(f.out, precision="fp8"), "precision"),
    "make_checkpoint seed str": (lambda f: synthetic.make_checkpoint(f.out, seed="1"), "seed"),
    "make_checkpoint delta nan": (lambda f: synthetic.make_checkpoint(f.out, delta=math.nan), "delta"),
    "make_checkpoint extra": (lambda f: synthetic.make_checkpoint(f.out, extra={"k": 1}), "extra"),
    "make_shuffled_finetune path None": (lambda f: demo.make_shuffled_finetune(None, 1, 2, 3), "path"),
    "make_shuffled_finetune perm_seed str": (lambda f: demo.make_shuffled_finetune(f.out, 1, 2, "3"), "perm_seed"),
    "make_dunkmash_standins None": (lambda f: demo.make_dunkmash_standins(None), "folder"),
    "make_dunkmash_standins a file": (lambda f: demo.make_dunkmash_standins(f.file), "not a folder"),
    "run_demo None": (lambda f: demo.run_demo(None), "folder"),
    "run_demo a file": (lambda f: demo.run_demo(f.file), "not a folder"),
    "parse_blocks None": (lambda f: parse_blocks(None, 0.5), "text"),
    "parse_blocks alpha str": (lambda f: parse_blocks("0.5," * 24 + "0.5", "x"), "alpha"),
    "alpha_schedule alpha None": (lambda f: legacy.alpha_schedule(None, 3), "alpha"),
    "alpha_schedule iterations str": (lambda f: legacy.alpha_schedule(0.5, "3"), "iterations"),
    "legacy_special_tensors get_a None": (lambda f: legacy.legacy_special_tensors(None, None, 0.5, 1), "get_a"),
    "telescoping_schedule alpha None": (lambda f: telescoping_schedule(None, 2), "alpha"),
    "Reporter progress int": (lambda f: Reporter(5, None), "progress"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_wrong_argument_is_one_line_naming_it(models: dict[str, Path], tmp_path: Path, case: str) -> None:
    files = Files(models, tmp_path)
    before = sorted(files.models.iterdir())
    call, needle = CASES[case]
    with pytest.raises(RebasinError) as e:
        call(files)
    message = str(e.value)
    assert "\n" not in message and len(message) < 400, message
    assert needle in message, message
    assert list(files.out_dir.iterdir()) == [] and sorted(files.models.iterdir()) == before
