"""Recipes: parse errors with line numbers, chain == step-by-step files, replay from metadata, cancel."""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import pytest
import torch

from lib_rebasin.checkpoint import open_checkpoint
from lib_rebasin.cli import main as cli_main
from lib_rebasin.errors import Cancelled
from lib_rebasin.merge import MergeOptions, merge_checkpoints
from lib_rebasin.recipe import RecipeError, load_recipe, parse_recipe, recipe_from_checkpoint, run_recipe

CHAIN = """
[recipe]
name = "three steps"
precision = "fp16"
parts = ["te", "vae"]

[models]
a = "a.safetensors"
b = "finetune.safetensors"
c = { file = "independent.safetensors" }

[[step]]
name = "m1"
method = "rebasin"
a = "a"
b = "b"
alpha = 0.25
iterations = 3

[[step]]
name = "m2"
method = "weighted_sum"
a = "m1"
b = "c"
alpha = 0.4

[[step]]
name = "final"
method = "add_difference"
a = "m2"
b = "b"
c = "a"
alpha = 0.2
"""


@pytest.fixture()
def folder(models: dict[str, Path], tmp_path: Path) -> Path:
    for name in ("a", "finetune", "independent"):
        shutil.copy(models[name], tmp_path / models[name].name)
    return tmp_path


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as ck:
        return {k: ck.get(k).clone() for k in ck.keys()}


def test_parse_errors_name_their_line() -> None:
    cases = {
        'a = 1\n[[step]\n': "line 2",                                        # TOML syntax
        '[models]\nx = "x.safetensors"\n[[step]]\na = "x"\nb = "later"\n[[step]]\nname = "later"\na = "x"\nb = "x"\n':
            "line 5: step 'step1' uses 'later', which is only made by a later step",
        '[models]\nx = "x.safetensors"\n[[step]]\na = "x"\nb = "nope"\n': "line 5: step 'step1': 'nope' is neither",
        '[models]\nx = "x.safetensors"\ny = "y.safetensors"\n[[step]]\nmethod = "blend"\na = "x"\nb = "y"\n':
            "line 4: step 'step1': Unknown method",
        '[models]\nx = "x.safetensors"\ny = "y.safetensors"\n[[step]]\na = "x"\nb = "y"\nalhpa = 0.3\n':
            "line 7: unknown step key(s) alhpa",
        '[models]\nx = "x.safetensors"\ny = "y.safetensors"\n[[step]]\nmethod = "add_difference"\na = "x"\nb = "y"\n':
            "line 4: step 'step1': Add difference needs c",
    }
    for text, expected in cases.items():
        with pytest.raises(RecipeError, match=re.escape(expected)):
            parse_recipe(text, "r.toml")


def test_missing_model_is_reported_before_any_work(folder: Path) -> None:
    text = CHAIN.replace('b = "finetune.safetensors"', 'b = "missing.safetensors"')
    with pytest.raises(RecipeError, match="line 9: model 'b': file missing.safetensors not found"):
        run_recipe(parse_recipe(text), folder, folder / "out.safetensors")
    assert not (folder / "out.safetensors").exists()


def test_chain_equals_steps_with_intermediate_files(folder: Path) -> None:
    recipe = parse_recipe(CHAIN)
    chained = run_recipe(recipe, folder, folder / "chain.safetensors").output
    a, b, c = folder / "a.safetensors", folder / "finetune.safetensors", folder / "independent.safetensors"
    o = dict(precision="fp16", parts=("te", "vae"))
    m1 = merge_checkpoints(a, b, folder / "m1.safetensors", MergeOptions(alpha=0.25, iterations=3, **o)).output
    m2 = merge_checkpoints(m1, c, folder / "m2.safetensors",
                           MergeOptions(method="weighted_sum", alpha=0.4, **o)).output
    final = merge_checkpoints(m2, b, folder / "final.safetensors", MergeOptions(method="add_difference", alpha=0.2, **o),
                              c=a).output
    x, y = _tensors(chained), _tensors(final)
    assert x.keys() == y.keys()
    assert all(x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]) for k in x)


def test_replay_from_metadata_is_bit_identical(folder: Path) -> None:
    first = run_recipe(parse_recipe(CHAIN), folder, folder / "first.safetensors").output
    text = recipe_from_checkpoint(first)
    assert "sha256" in text
    (folder / "replay.toml").write_text(text)
    assert cli_main(["recipe", str(folder / "replay.toml"), "-o", str(folder / "second.safetensors"), "-q"]) == 0
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (first, folder / "second.safetensors")]
    assert digest[0] == digest[1]
    assert load_recipe(folder / "replay.toml").to_toml() == text  # canonical text round-trips


def test_single_merge_metadata_gives_a_recipe(folder: Path) -> None:
    out = merge_checkpoints(folder / "a.safetensors", folder / "finetune.safetensors", folder / "o.safetensors",
                            MergeOptions(method="weighted_sum", alpha=0.3, precision="fp32")).output
    (folder / "r.toml").write_text(recipe_from_checkpoint(out))
    again = run_recipe(load_recipe(folder / "r.toml"), folder, folder / "o2.safetensors").output
    x, y = _tensors(out), _tensors(again)
    assert all(torch.equal(x[k], y[k]) for k in x)


def test_cancel_mid_chain_leaves_no_file(folder: Path) -> None:
    seen = []

    def progress(ev) -> None:
        seen.append(ev.message)

    def cancel() -> bool:
        return any(m.startswith("step 2/3") for m in seen)

    with pytest.raises(Cancelled):
        run_recipe(parse_recipe(CHAIN), folder, folder / "out.safetensors", progress=progress, cancel=cancel)
    assert sorted(p.name for p in folder.iterdir()) == ["a.safetensors", "finetune.safetensors",
                                                       "independent.safetensors"]


def test_activation_matching_round_trips_through_a_recipe(folder: Path) -> None:
    """matching / activation_samples are recipe keys, recorded in the metadata, replayed bit for bit."""
    text = parse_recipe(CHAIN).to_toml()
    assert "matching" not in text  # weight matching writes no new line: old recipes keep their text
    out = merge_checkpoints(folder / "a.safetensors", folder / "independent.safetensors", folder / "o.safetensors",
                            MergeOptions(matching="activations", activation_samples=2, parts=("te",),
                                         precision="fp32")).output
    recorded = recipe_from_checkpoint(out)
    assert 'matching = "activations"' in recorded and "activation_samples = 2" in recorded
    (folder / "r.toml").write_text(recorded)
    again = run_recipe(load_recipe(folder / "r.toml"), folder, folder / "o2.safetensors").output
    x, y = _tensors(out), _tensors(again)
    assert all(torch.equal(x[k], y[k]) for k in x)
    with pytest.raises(RecipeError, match="matching must be one of weights, activations"):
        parse_recipe(recorded.replace('matching = "activations"', 'matching = "activation"'))
