"""Block weights: the key -> block mapping over the full SD 1.5 layout, the presets, parsing, and per-key alphas."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from test_spec import SHARED_KEYS

from lib_rebasin.cli import main as cli_main
from lib_rebasin.errors import RebasinError
from lib_rebasin.io.checkpoint import open_checkpoint
from lib_rebasin.merge.block_presets import ALIASES, PRESETS
from lib_rebasin.merge.block_weights import BLOCK_IDS, MAPPING_VERSION, block_of, parse_blocks
from lib_rebasin.merge.run import merge_checkpoints, merge_in_memory
from lib_rebasin.options import MergeOptions
from lib_rebasin.parts import part_of
from lib_rebasin.recipe.parse import parse_recipe
from lib_rebasin.recipe.run import run_recipe
from lib_rebasin.sd1.config import SD15
from lib_rebasin.sd1.spec import build_spec

FP32 = {"precision": "fp32"}


def _load(path: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as ck:
        return {k: ck.get(k).clone() for k in ck}


def _merged(a: Path, b: Path, options: MergeOptions, c: Path | None = None):
    """The merge held in memory (the tensors `merge_checkpoints` would write: the file is not under test here),
    and its diagnostics."""
    ckpt, diagnostics = merge_in_memory(a, b, options, c=c)
    return {k: ckpt.get(k) for k in ckpt}, diagnostics


def _expected_block(key: str) -> str:
    """The convention, restated by splitting the key (independent of blocks.RULES' regular expressions)."""
    if key.startswith(("cond_stage_model.", "first_stage_model.")):
        return "BASE"
    assert key.startswith("model.diffusion_model."), key
    name = key[len("model.diffusion_model."):].split(".")
    if name[0] == "time_embed":
        return "IN00"
    if name[0] == "input_blocks":
        return f"IN{int(name[1]):02d}"
    if name[0] == "middle_block":
        return "M00"
    if name[0] == "output_blocks":
        return f"OUT{int(name[1]):02d}"
    if name[0] == "out":
        return "OUT11"
    raise AssertionError(key)


def test_every_sd15_key_maps_to_its_block() -> None:
    spec = build_spec(SD15)
    counts = dict.fromkeys(BLOCK_IDS, 0)
    for key in spec.shapes:
        if part_of(key) == "other":
            assert block_of(key) is None, key
            continue
        assert block_of(key) == _expected_block(key), key
        counts[_expected_block(key)] += 1
    assert all(n > 0 for n in counts.values()), counts
    # IN00 = time_embed (2 linears) + input_blocks.0 (conv_in): 6 tensors; OUT11 includes out.0 / out.2
    assert counts["IN00"] == 6
    assert block_of("model.diffusion_model.out.2.weight") == "OUT11"
    assert block_of("model.diffusion_model.output_blocks.11.1.proj_out.weight") == "OUT11"
    assert block_of("first_stage_model.decoder.conv_out.weight") == "BASE"
    assert block_of("model_ema.decay") is None and block_of("alphas_cumprod") is None


@pytest.mark.skipif(not SHARED_KEYS.exists(), reason="shared/data/sd1-ldm-keys.yaml not beside the checkout")
def test_the_published_sd1_layout_maps_every_key() -> None:
    layout = yaml.safe_load(SHARED_KEYS.read_text())["components"]
    spec_keys = set(build_spec(SD15).shapes)
    for component in ("diffuser", "clip_l", "vae"):
        for key in layout[component]:
            assert key in spec_keys, key
            if key.endswith("position_ids"):
                continue
            assert block_of(key) == _expected_block(key), key


def test_presets_are_the_tools_numbers() -> None:
    assert len(PRESETS) == 38
    assert all(len(v) == 26 for v in PRESETS.values())
    # published values, read from SuperMerger's mbwpresets.txt / sd-meh's presets.py
    assert PRESETS["GRAD_V"][:4] == (0.0, 1.0, 0.9166666667, 0.8333333333) and PRESETS["GRAD_V"][13] == 0.0
    assert PRESETS["WRAP08"] == (0, 1, 1, 1, 1) + (0,) * 17 + (1, 1, 1, 1)
    assert PRESETS["OUT12"] == (0,) * 14 + (1,) * 12
    assert PRESETS["OUT12_5"][13] == 0.5
    assert PRESETS["RING08_SOFT"][6:11] == (0.5, 1, 1, 1, 0.5)
    assert PRESETS["TRUE_CUBIC_HERMITE"][2] == 0.199031876929012
    assert PRESETS["FAKE_REVERSE_CUBIC_HERMITE"][24] == 0.157576195987653
    assert PRESETS["SMOOTHSTEP*3"][11] == 0.871527777777778
    assert PRESETS["ALL_A"] == (0,) * 26 and PRESETS["ALL_B"] == (1,) * 26
    # the smooth curves are what their names say, over the 25 UNet blocks (x = i / 24)
    for i in range(25):
        x = i / 24
        assert math.isclose(PRESETS["SMOOTHSTEP"][i + 1], 3 * x * x - 2 * x ** 3, abs_tol=1e-12)
        assert math.isclose(PRESETS["COSINE"][i + 1], (1 + math.cos(math.pi * x)) / 2, abs_tol=1e-12)
        assert math.isclose(PRESETS["REVERSE_COSINE"][i + 1], (1 - math.cos(math.pi * x)) / 2, abs_tol=1e-12)
    for alias, name in ALIASES.items():
        assert parse_blocks(alias.lower(), 0.5).values == PRESETS[name]


def test_parse_26_25_and_preset() -> None:
    values = [round(i / 25, 4) for i in range(26)]
    bw = parse_blocks(",".join(map(str, values)), 0.5)
    assert bw.values == tuple(values) and bw.preset is None
    bw = parse_blocks(", ".join(map(str, values[1:])), 0.3)
    assert bw.values == (0.3, *values[1:])
    bw = parse_blocks(" grad_v ", 0.5)
    assert bw.preset == "GRAD_V" and bw.values == PRESETS["GRAD_V"]
    for bad, message in (("", "empty"), ("0.5,0.5", "got 2"), ("NOPE", "Unknown block-weight preset 'NOPE'"),
                         ("0.5," * 25 + "x", "Block weight 26 ('x') is not a number"),
                         (",".join(["0.5"] * 27), "got 27")):
        with pytest.raises(RebasinError, match=re.escape(message)) as e:
            parse_blocks(bad, 0.5)
        assert "\n" not in str(e.value)
    with pytest.raises(RebasinError, match="Block weight IN03 must be between 0 and 1"):
        MergeOptions(method="weighted_sum", blocks=(0.5,) * 4 + (1.5,) + (0.5,) * 21).validate()
    MergeOptions(method="add_difference", blocks=(0.5,) * 4 + (1.5,) + (0.5,) * 21).validate()  # unbounded


def _distinct_blocks() -> tuple[float, ...]:
    return tuple(round(0.02 + i * 0.035, 4) for i in range(26))


def test_each_key_gets_its_blocks_alpha(tiny_models: dict[str, Path]) -> None:
    blocks = _distinct_blocks()
    a, b = _load(tiny_models["a"]), _load(tiny_models["finetune"])
    for method in ("weighted_sum", "rebasin"):
        out, _ = _merged(tiny_models["a"], tiny_models["finetune"], MergeOptions(method=method, blocks=blocks, **FP32))
        for k in a:
            block = block_of(k)
            if block is None or not a[k].is_floating_point() or k.endswith("position_ids"):
                assert torch.equal(out[k], a[k]), k
                continue
            w = blocks[BLOCK_IDS.index(block)]
            torch.testing.assert_close(out[k], (1 - w) * a[k] + w * b[k], rtol=0, atol=1e-6, msg=f"{method} {k}")


def test_all_a_gives_a_and_all_b_gives_b(tiny_models: dict[str, Path]) -> None:
    a, b = _load(tiny_models["a"]), _load(tiny_models["finetune"])
    for preset, want in (("ALL_A", a), ("ALL_B", b)):
        bw = parse_blocks(preset, 0.5)
        for method in ("weighted_sum", "rebasin"):
            out, _ = _merged(tiny_models["a"], tiny_models["finetune"],
                             MergeOptions(method=method, blocks=bw.values, blocks_preset=bw.preset, **FP32))
            merged = [k for k in a if block_of(k) is not None and a[k].is_floating_point()
                      and not k.endswith("position_ids")]
            assert merged and all(torch.equal(out[k], want[k]) for k in merged), (preset, method)


def test_uniform_blocks_equal_plain_alpha_bit_for_bit(tiny_models: dict[str, Path]) -> None:
    models = tiny_models
    for method, iterations in (("weighted_sum", 1), ("rebasin", 3)):
        p, plain = _merged(models["a"], models["shuffled"],
                           MergeOptions(method=method, alpha=0.3, iterations=iterations, **FP32))
        f, flat = _merged(models["a"], models["shuffled"],
                          MergeOptions(method=method, alpha=0.3, iterations=iterations, blocks=(0.3,) * 26, **FP32))
        assert all(torch.equal(p[k], f[k]) for k in p), method
        assert flat.closed_form_steps == plain.closed_form_steps


def test_iterated_rebasin_telescopes_per_block(tiny_models: dict[str, Path]) -> None:
    """A same-base pair: every permutation is the identity, so N iterations give each block exactly its weight."""
    blocks = _distinct_blocks()
    a, b = _load(tiny_models["a"]), _load(tiny_models["finetune"])
    out, diagnostics = _merged(tiny_models["a"], tiny_models["finetune"],
                               MergeOptions(method="rebasin", iterations=4, blocks=blocks, **FP32))
    assert diagnostics.match_steps == 4 and diagnostics.closed_form_steps == 0  # non-uniform: no shortcut
    for k in a:
        block = block_of(k)
        if block is None or not a[k].is_floating_point() or k.endswith("position_ids"):
            continue
        w = blocks[BLOCK_IDS.index(block)]
        torch.testing.assert_close(out[k], (1 - w) * a[k] + w * b[k], rtol=0, atol=1e-5, msg=k)


def test_blocks_with_a_delta_method(tiny_models: dict[str, Path]) -> None:
    c = tiny_models["independent"]
    a, b, cc = _load(tiny_models["a"]), _load(tiny_models["finetune"]), _load(c)
    blocks = _distinct_blocks()
    out, _ = _merged(tiny_models["a"], tiny_models["finetune"],
                     MergeOptions(method="train_difference", blocks=blocks, **FP32), c=c)
    from lib_rebasin.methods import key_generator, train_difference

    for k in ("model.diffusion_model.middle_block.1.proj_in.weight",
              "model.diffusion_model.output_blocks.4.0.in_layers.2.weight",
              "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"):
        w = blocks[BLOCK_IDS.index(block_of(k))]
        torch.testing.assert_close(out[k], train_difference(a[k], b[k], cc[k], w, {}, key_generator(0, k)),
                                   rtol=0, atol=1e-6)


def test_cli_blocks_metadata_and_errors(tiny_models: dict[str, Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cli.safetensors"
    assert cli_main(["merge", str(tiny_models["a"]), str(tiny_models["finetune"]), "--method", "weighted_sum",
                     "--blocks", "GRAD_V", "-o", str(out), "-q"]) == 0
    assert "Block weights (BASE, IN00-IN11, M00, OUT00-OUT11): GRAD_V = 0, 1, 0.9166666667" in capsys.readouterr().out
    with open_checkpoint(out) as ck:
        meta = ck.metadata
    ours = json.loads(meta["lib_rebasin"])["recipe"]
    webui = json.loads(meta["sd_merge_recipe"])
    assert ours["blocks"] == list(PRESETS["GRAD_V"]) and ours["blocks_preset"] == "GRAD_V"
    assert ours["block_mapping"] == MAPPING_VERSION == webui["block_mapping"]
    assert webui["blocks"] == list(PRESETS["GRAD_V"]) and webui["mbw"] is True
    assert webui["weights_alpha"] == list(PRESETS["GRAD_V"][1:]) and webui["base_alpha"] == 0.0
    bad = tmp_path / "bad.safetensors"
    assert cli_main(["merge", str(tiny_models["a"]), str(tiny_models["finetune"]), "--blocks", "1,2,3", "-o", str(bad),
                     "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Block weights need 26 values" in err and not bad.exists()
    assert cli_main(["merge", str(tiny_models["a"]), str(tiny_models["finetune"]), "--method", "legacy", "--blocks",
                     "GRAD_V", "-o", str(bad), "-q"]) == 2
    assert "no block weights" in capsys.readouterr().err and not bad.exists()


def test_recipe_blocks_per_step_and_default(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    text = f"""
[recipe]
name = "blocks"
precision = "fp16"
blocks = "OUT12"

[models]
a = "{tiny_models['a'].name}"
b = "{tiny_models['finetune'].name}"
c = "{tiny_models['independent'].name}"

[[step]]
name = "one"
method = "weighted_sum"
a = "a"
b = "b"

[[step]]
name = "two"
method = "ties"
a = "one"
b = "b"
c = "c"
ties_density = 0.5
blocks = [{", ".join(["0.25"] * 25)}]
alpha = 0.75
"""
    recipe = parse_recipe(text)
    one, two = recipe.steps
    assert one.options.blocks == PRESETS["OUT12"] and one.options.blocks_preset == "OUT12"
    assert two.options.blocks == (0.75,) + (0.25,) * 25 and two.options.ties_density == 0.5
    again = parse_recipe(recipe.to_toml())
    assert [s.options for s in again.steps] == [s.options for s in recipe.steps]
    res = run_recipe(recipe, tiny_models["a"].parent, tmp_path / "r.safetensors")
    stored = json.loads(res.metadata["lib_rebasin"])["recipe_toml"]
    assert 'blocks = "OUT12"' in stored and "ties_density = 0.5" in stored
    bad = text.replace('blocks = "OUT12"', 'blocks = "WRAP99"')
    with pytest.raises(RebasinError, match="Unknown block-weight preset 'WRAP99'"):
        parse_recipe(bad)


def test_recipe_from_a_single_merge_keeps_blocks_and_params(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    from lib_rebasin.recipe.from_output import recipe_from_checkpoint

    out = merge_checkpoints(tiny_models["a"], tiny_models["finetune"], tmp_path / "t.safetensors",
                            MergeOptions(method="ties", ties_density=0.3, blocks=PRESETS["RING10_3"],
                                         blocks_preset="RING10_3", parts=("te",), precision="fp16"),
                            c=tiny_models["independent"]).output
    step = parse_recipe(recipe_from_checkpoint(out)).steps[0]
    assert step.options.method == "ties" and step.options.ties_density == 0.3
    assert step.options.blocks == PRESETS["RING10_3"] and step.options.blocks_preset == "RING10_3"


def test_iterated_rebasin_with_blocks_on_the_unet_only(tiny_models: dict[str, Path]) -> None:
    """BASE's weight differs from every UNet weight and the text encoder is not merged: still one value per key."""
    blocks = (0.9,) + (0.25,) * 25
    a, b = _load(tiny_models["a"]), _load(tiny_models["finetune"])
    out, _ = _merged(tiny_models["a"], tiny_models["finetune"],
                     MergeOptions(method="rebasin", iterations=2, blocks=blocks, parts=("unet",), **FP32))
    k = "model.diffusion_model.output_blocks.3.1.transformer_blocks.0.attn2.to_k.weight"
    torch.testing.assert_close(out[k], 0.75 * a[k] + 0.25 * b[k], rtol=0, atol=1e-5)
    te = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
    assert torch.equal(out[te], a[te])
