"""Recipes: parse errors with line numbers, chain == step-by-step files, replay from metadata, cancel."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
import torch
from model_cache import place
from same_bytes import file_holds, held_checkpoint

from lib_rebasin.cli import main as cli_main
from lib_rebasin.errors import Cancelled
from lib_rebasin.io.checkpoint import open_checkpoint
from lib_rebasin.merge.run import merge_checkpoints, merge_in_memory
from lib_rebasin.options import MergeOptions
from lib_rebasin.recipe.format import RecipeError
from lib_rebasin.recipe.from_output import recipe_from_checkpoint
from lib_rebasin.recipe.parse import load_recipe, parse_recipe
from lib_rebasin.recipe.run import recipe_in_memory, run_recipe

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


@pytest.fixture(scope="module")
def models(tiny_models: dict[str, Path]) -> dict[str, Path]:
    """Tiny models in place of the mini ones: what is tested is recipes, not the spec."""
    return tiny_models


@pytest.fixture()
def folder(models: dict[str, Path], tmp_path: Path) -> Path:
    for name in ("a", "finetune", "independent"):
        place(models[name], tmp_path / models[name].name)
    return tmp_path


@pytest.fixture()
def folder_without_vae(tiny_models_without_vae: dict[str, Path], tmp_path: Path) -> Path:
    """The same folder, of the models without their VAE: for a merge that leaves the VAE alone (it is copied from
    A), whose files are then half the bytes."""
    for name in ("a", "finetune", "independent"):
        place(tiny_models_without_vae[name], tmp_path / f"{name}.safetensors")
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
    # the last step's tensors, held in memory: those its file would hold
    final, _ = merge_in_memory(m2, b, MergeOptions(method="add_difference", alpha=0.2, **o), c=a)
    final_keys = final.keys()
    x, y = _tensors(chained), {k: final.get(k) for k in final_keys}
    assert x.keys() == y.keys()
    assert all(x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]) for k in x)
    # the chain run into memory holds what its file holds: the tensors in order and the metadata (the recipe's)
    assert file_holds(chained, held_checkpoint(recipe_in_memory(recipe, folder)))


def test_replay_from_metadata_is_bit_identical(folder: Path) -> None:
    first = run_recipe(parse_recipe(CHAIN), folder, folder / "first.safetensors").output
    text = recipe_from_checkpoint(first)
    assert "sha256" in text
    (folder / "replay.toml").write_text(text)
    assert cli_main(["recipe", str(folder / "replay.toml"), "-o", str(folder / "second.safetensors"), "-q"]) == 0
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (first, folder / "second.safetensors")]
    assert digest[0] == digest[1]
    assert load_recipe(folder / "replay.toml").to_toml() == text  # canonical text round-trips


def test_single_merge_metadata_gives_a_recipe(folder_without_vae: Path) -> None:
    # fp32, not the default, shows the precision is recorded and replayed; the other single merges here are written
    # at fp16 (half the bytes), their precision not being what they test. The replay, compared with the file, is
    # held in memory (recipe_in_memory holds what run_recipe writes: test_chain_equals_steps_with_intermediate_files).
    folder = folder_without_vae
    out = merge_checkpoints(folder / "a.safetensors", folder / "finetune.safetensors", folder / "o.safetensors",
                            MergeOptions(method="weighted_sum", alpha=0.3, precision="fp32")).output
    (folder / "r.toml").write_text(recipe_from_checkpoint(out))
    again = recipe_in_memory(load_recipe(folder / "r.toml"), folder)
    x, y = _tensors(out), again.tensors
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


# -- baking a VAE in a recipe ----------------------------------------------------------------------------------

BAKED = """
[recipe]
name = "baked"
precision = "fp32"
bake_vae = "mse"

[models]
a = "a.safetensors"
b = "finetune.safetensors"
mse = "donor.vae.safetensors"

[[step]]
name = "m1"
method = "weighted_sum"
a = "a"
b = "b"
alpha = 0.3

[[step]]
name = "final"
method = "weighted_sum"
a = "m1"
b = "b"
alpha = 0.5
"""


def _vae_file(models: dict[str, Path], where: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    from model_cache import cached_state_dict
    from safetensors.torch import load_file

    donor = load_file(str(models["independent"]))
    vae = {k[len("first_stage_model."):]: v for k, v in donor.items() if k.startswith("first_stage_model.")}
    where.mkdir(parents=True, exist_ok=True)
    return cached_state_dict(where / "donor.vae.safetensors", vae), donor


def test_recipe_bakes_a_vae_from_the_vae_folder_and_replays_it(models: dict[str, Path], folder: Path,
                                                                tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    import json

    from safetensors.torch import load_file

    vae_dir = tmp_path / "VAE"
    vae_path, donor = _vae_file(models, vae_dir)
    recipe_file = folder / "baked.toml"
    recipe_file.write_text(BAKED)
    out = tmp_path / "out" / "baked.safetensors"
    out.parent.mkdir()
    # without the VAE folder the VAE is not found: one line naming where it looked, no output
    assert cli_main(["recipe", str(recipe_file), "-o", str(out), "--models-dir", str(folder), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model 'mse': file donor.vae.safetensors not found" in err
    assert "--vae-dir" in err and not out.exists()
    assert cli_main(["recipe", str(recipe_file), "-o", str(out), "--models-dir", str(folder),
                     "--vae-dir", str(vae_dir), "-q"]) == 0
    merged = load_file(str(out))
    a, b = load_file(str(folder / "a.safetensors")), load_file(str(folder / "finetune.safetensors"))
    vae_keys = [k for k in merged if k.startswith("first_stage_model.")]
    assert vae_keys and all(torch.equal(merged[k], donor[k]) for k in vae_keys)
    unet = next(k for k in merged if k.startswith("model.diffusion_model.") and k.endswith(".weight"))
    torch.testing.assert_close(merged[unet], 0.5 * (0.7 * a[unet] + 0.3 * b[unet]) + 0.5 * b[unet])
    with open_checkpoint(out) as ck:
        meta = ck.metadata
    assert json.loads(meta["lib_rebasin"])["recipe_toml"].count('bake_vae = "mse"') == 1
    sha = hashlib.sha256(vae_path.read_bytes()).hexdigest()
    assert json.loads(meta["sd_merge_recipe"])["models"]["mse"]["sha256"] == sha
    # the recorded recipe pins the VAE by hash and finds it in the folder it was read from
    replay = recipe_from_checkpoint(out)
    assert 'bake_vae = "mse"' in replay and sha in replay
    again = tmp_path / "replay.toml"
    again.write_text(replay)
    # the replay (the CLI's recipe command was run above) held in memory: what its file would hold
    replayed = recipe_in_memory(load_recipe(again), folder).tensors
    assert replayed.keys() == merged.keys()
    assert all(torch.equal(replayed[k], merged[k]) for k in merged)


def test_recipe_bake_vae_errors_name_the_line_and_write_nothing(models: dict[str, Path], folder: Path,
                                                                 tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"bake_vae = \"nope\" is not a model in \[models\]"):
        parse_recipe(BAKED.replace('bake_vae = "mse"', 'bake_vae = "nope"'))
    with pytest.raises(RecipeError, match="bake_vae must be a string"):
        parse_recipe(BAKED.replace('bake_vae = "mse"', "bake_vae = 3"))
    # a "VAE" that is not one (a UNet-only file): refused before any work, no output
    from model_cache import cached_state_dict
    from safetensors.torch import load_file

    donor = load_file(str(models["independent"]))
    cached_state_dict(folder / "donor.vae.safetensors",
                      {k: v for k, v in donor.items() if k.startswith("model.diffusion_model.")})
    recipe = parse_recipe(BAKED)
    out = tmp_path / "never.safetensors"
    with pytest.raises(Exception, match="donor.vae.safetensors is not an SD 1.x VAE"):
        run_recipe(recipe, folder, out)
    assert not out.exists() and not list(tmp_path.glob(".*never*"))


def test_single_merge_with_a_baked_vae_gives_a_recipe_that_bakes_it(models: dict[str, Path], tmp_path: Path
                                                                    ) -> None:
    from safetensors.torch import load_file

    vae_path, donor = _vae_file(models, tmp_path / "VAE")
    out = tmp_path / "single.safetensors"
    merge_checkpoints(models["a"], models["finetune"], out, MergeOptions(method="weighted_sum", precision="fp16"),
                      bake_vae=vae_path)
    text = recipe_from_checkpoint(out)
    recipe = parse_recipe(text)
    assert recipe.bake_vae == "vae" and recipe.models["vae"].folder == str(vae_path.parent.resolve())
    a, b = load_file(str(out)), recipe_in_memory(recipe, models["a"].parent).tensors  # the replay, held in memory
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_activation_matching_round_trips_through_a_recipe(folder_without_vae: Path) -> None:
    """matching / activation_samples are recipe keys, recorded in the metadata, replayed bit for bit (the text
    encoder's matching: the models without their VAE; the replay held in memory)."""
    folder = folder_without_vae
    text = parse_recipe(CHAIN).to_toml()
    assert "matching" not in text  # weight matching writes no new line: old recipes keep their text
    out = merge_checkpoints(folder / "a.safetensors", folder / "independent.safetensors", folder / "o.safetensors",
                            MergeOptions(matching="activations", activation_samples=2, parts=("te",),
                                         precision="fp16")).output
    recorded = recipe_from_checkpoint(out)
    assert 'matching = "activations"' in recorded and "activation_samples = 2" in recorded
    (folder / "r.toml").write_text(recorded)
    x, y = _tensors(out), recipe_in_memory(load_recipe(folder / "r.toml"), folder).tensors
    assert all(torch.equal(x[k], y[k]) for k in x)
    with pytest.raises(RecipeError, match="matching must be one of weights, activations"):
        parse_recipe(recorded.replace('matching = "activations"', 'matching = "activation"'))


REPAIRED = """
[models]
a = "a.safetensors"
b = "finetune.safetensors"

[[step]]
name = "m1"
method = "weighted_sum"
a = "a"
b = "b"
parts = ["unet"]
repair = true
"""


def _line_of(text: str, needle: str) -> int:
    return next(n for n, line in enumerate(text.splitlines(), 1) if needle in line)


def test_repair_is_a_recipe_key_written_back_with_its_prompts() -> None:
    recipe = parse_recipe(REPAIRED)
    assert recipe.steps[0].options.repair is True
    text = recipe.to_toml()
    assert "repair = true" in text and "activation_samples = 4" in text  # the prompts REPAIR runs on
    assert parse_recipe(text).to_toml() == text
    # with activation matching too, the shared prompt count is written once
    both = parse_recipe(REPAIRED.replace('"weighted_sum"', '"rebasin"') + 'matching = "activations"\n').to_toml()
    assert both.count("activation_samples") == 1 and "repair = true" in both
    # a [recipe] default applies to every step; without it, no step has a repair line (old recipes keep their text)
    assert parse_recipe("[recipe]\nrepair = true\n" + REPAIRED.replace("repair = true\n", "")).steps[0].options.repair
    assert "repair" not in parse_recipe(CHAIN).to_toml()


@pytest.mark.parametrize("change, message", [
    (("repair = true", "repair = 1"), "repair must be true or false, got 1"),
    (('"weighted_sum"', '"add_difference"\nc = "a"'), "Add difference is not one (use it with rebasin or "
                                                      "weighted_sum)"),
    (('parts = ["unet"]', 'parts = ["te", "vae"]'), "REPAIR corrects UNet layers; parts must include unet"),
])
def test_repair_errors_name_the_step_and_the_repair_line(change: tuple[str, str], message: str) -> None:
    text = REPAIRED.replace(*change)
    with pytest.raises(RecipeError) as e:
        parse_recipe(text, "r.toml")
    assert str(e.value).startswith(f"r.toml, line {_line_of(text, 'repair =')}: step 'm1': ")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_repair_round_trips_through_a_recipe(folder_without_vae: Path) -> None:
    """A single merge made with REPAIR records it (and its prompt count); `recipe --from` gives it back and the
    replay equals the original bit for bit (REPAIR corrects the UNet: the models without their VAE)."""
    folder = folder_without_vae
    out = merge_checkpoints(folder / "a.safetensors", folder / "finetune.safetensors", folder / "o.safetensors",
                            MergeOptions(method="weighted_sum", repair=True, activation_samples=1, parts=("unet",),
                                         precision="fp16")).output
    recorded = recipe_from_checkpoint(out)
    assert "repair = true" in recorded and "activation_samples = 1" in recorded
    (folder / "r.toml").write_text(recorded)
    again = run_recipe(load_recipe(folder / "r.toml"), folder, folder / "o2.safetensors").output
    assert parse_recipe(recipe_from_checkpoint(again)).steps[0].options.repair is True
    x, y = _tensors(out), _tensors(again)
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
