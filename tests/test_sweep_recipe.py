"""Recipes whose last step's alpha is a list (a sweep): the earlier steps run once, the last step matches once,
and each output is byte for byte the recipe run with that one value, recording (and replaying to) it."""

from __future__ import annotations

from pathlib import Path

import pytest
from model_cache import place
from same_bytes import file_holds, held_checkpoint

import lib_rebasin.align.weight_matching as weight_matching_module
import lib_rebasin.merge.alignment as alignment_module
from lib_rebasin.cli import main as cli_main
from lib_rebasin.errors import FieldError
from lib_rebasin.recipe.format import RecipeError
from lib_rebasin.recipe.from_output import recipe_from_checkpoint
from lib_rebasin.recipe.parse import parse_recipe
from lib_rebasin.recipe.run import recipe_in_memory, run_recipe

RECIPE = """
[recipe]
name = "swept"
precision = "fp16"

[models]
a = "a.safetensors"
b = "finetune.safetensors"
c = "independent.safetensors"

[[step]]
name = "soup"
method = "weighted_sum"
a = "a"
b = "b"
alpha = 0.4

[[step]]
name = "final"
method = "rebasin"
a = "soup"
b = "c"
alpha = ALPHA
"""


@pytest.fixture
def folder(tmp_path: Path, tiny_models_without_vae: dict[str, Path]) -> Path:
    """The tiny models without their VAE: what is tested is how a recipe sweeps its last step, and every file is
    half the bytes."""
    for name in ("a", "finetune", "independent"):
        place(tiny_models_without_vae[name], tmp_path / f"{name}.safetensors")
    return tmp_path


def test_recipe_sweep_is_each_single_recipe(folder, monkeypatch, capsys):
    calls: list[int] = []
    real = weight_matching_module.weight_matching
    monkeypatch.setattr(alignment_module, "weight_matching", lambda *a, **k: calls.append(1) or real(*a, **k))
    (folder / "r.toml").write_text(RECIPE.replace("ALPHA", "[0.3, 0.7]"))
    assert cli_main(["recipe", str(folder / "r.toml"), "-o", str(folder / "r_{alpha}.safetensors"), "-q"]) == 0
    assert len(calls) == 1
    out = capsys.readouterr().out
    assert f"Wrote {folder / 'r_0.3.safetensors'}" in out and f"Wrote {folder / 'r_0.7.safetensors'}" in out
    for alpha in (0.3, 0.7):
        recipe = parse_recipe(RECIPE.replace("ALPHA", str(alpha)))
        if alpha == 0.3:  # the file the single recipe writes, byte for byte
            single = folder / f"single_{alpha}.safetensors"
            run_recipe(recipe, folder, single)
            assert (folder / f"r_{alpha}.safetensors").read_bytes() == single.read_bytes()
        else:  # what it holds (tensors in order, metadata), held in memory
            assert file_holds(folder / f"r_{alpha}.safetensors", held_checkpoint(recipe_in_memory(recipe, folder)))
        replay = recipe_from_checkpoint(folder / f"r_{alpha}.safetensors")
        assert f"alpha = {alpha}" in replay.split('name = "final"')[1]


@pytest.mark.parametrize("text, words", [
    (RECIPE.replace("alpha = 0.4", "alpha = [0.4, 0.5]").replace("ALPHA", "0.5"), "line 16: step 'soup': alpha is "
     "a list (a sweep) only in the last step"),
    (RECIPE.replace('precision = "fp16"', "alpha = [0.1, 0.2]").replace("alpha = 0.4\n", "").replace(
        "alpha = ALPHA\n", ""), "only in the last step"),
    (RECIPE.replace("ALPHA", "[0.3, 1.5]"), "line 23: step 'final': alpha value 2 of 2: alpha must be in [0, 1]"),
    (RECIPE.replace("ALPHA", "[0.3, 0.3]"), "alpha 0.3 is listed twice"),
    (RECIPE.replace("ALPHA", "[]"), "alpha = [] lists no value"),
])
def test_recipe_sweep_refusals(text, words):
    with pytest.raises(RecipeError) as e:
        parse_recipe(text)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_recipe_sweep_needs_a_template_and_round_trips(folder):
    recipe = parse_recipe(RECIPE.replace("ALPHA", "[0.3, 0.7]"))
    assert "alpha = [0.3, 0.7]" in recipe.to_toml()
    assert parse_recipe(recipe.to_toml()).steps[-1].alphas == (0.3, 0.7)
    with pytest.raises(FieldError, match=r"must contain \{alpha\}"):
        run_recipe(recipe, folder, folder / "plain.safetensors")
    assert not list(folder.glob("plain*"))
    with pytest.raises(RecipeError, match=r"step 'final''s alpha is a list .* run it with run_recipe"):
        recipe_in_memory(recipe, folder)  # one result in memory: a sweep is refused
