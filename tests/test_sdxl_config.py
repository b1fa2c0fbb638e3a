"""SDXL: the key layout at full size, hyper-parameters read from shapes, recognition, and refusal (for now) with a
one-line message before any work."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from model_cache import _cached, place

from lib_rebasin.errors import IncompatibleModelsError, UnsupportedModelError
from lib_rebasin.io.checkpoint import open_checkpoint
from lib_rebasin.io.describe import inspect_checkpoint
from lib_rebasin.merge.run import merge_checkpoints
from lib_rebasin.options import MergeOptions
from lib_rebasin.parts import UNET, part_of
from lib_rebasin.sd1.config import detect as sd1_detect
from lib_rebasin.sdxl.config import CLIP_G, CLIP_L, MINI, SDXL_BASE, check_layout, detect
from lib_rebasin.sdxl.spec import OPTIONAL, build_spec
from lib_rebasin.sdxl.synthetic import make_checkpoint

# A model for file tests: SDXL's topology at the smallest widths the detector accepts, so files stay small.
FILE_SCALE = replace(MINI, transformer_depth=(0, 1, 1), clip_l_layers=2, clip_g_layers=2, vae_channels=32)


def test_full_size_layout_matches_sdxl_base() -> None:
    """Key counts and parameter counts per component of SDXL base 1.0 in the SGM layout, as listed in
    ../shared/research/merging_frontier_2026.md (Q3), measured from sd-mecha's `sdxl-sgm.yaml`; its UNet count
    includes the four optional NoobAI markers (`v_pred`, `ztsnr`, `edm_vpred.sigma_min/max`), which are not
    part of the architecture."""
    shapes = build_spec(SDXL_BASE).shapes
    count = Counter(k.split(".model." if k.startswith(CLIP_G) else ".transformer.")[0]
                    if k.startswith("conditioner.") else part_of(k) for k in shapes)
    assert count == {"unet": 1684 - 4, "conditioner.embedders.0": 197, "conditioner.embedders.1": 390, "vae": 248}
    params = {p: round(sum(math.prod(s) for k, s in shapes.items() if k.startswith(prefix)) / 1e6, 1)
              for p, prefix in (("unet", UNET), ("clip_l", CLIP_L), ("clip_g", CLIP_G), ("vae", "first_stage"))}
    assert params == {"unet": 2567.5, "clip_l": 123.1, "clip_g": 694.7, "vae": 83.7}
    assert shapes[f"{UNET}label_emb.0.0.weight"] == (1280, 2816)
    assert shapes[f"{UNET}input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight"] == (1280, 2048)
    assert shapes[f"{UNET}input_blocks.4.1.proj_in.weight"] == (640, 640)  # linear
    assert shapes[f"{CLIP_G}transformer.resblocks.31.attn.in_proj_weight"] == (3840, 1280)
    assert f"{UNET}input_blocks.1.1.proj_in.weight" not in shapes  # no attention at the 320 level
    assert shapes[f"{UNET}output_blocks.2.2.conv.weight"] == (1280, 1280, 3, 3)


def test_full_size_groups() -> None:
    spec = build_spec(SDXL_BASE)
    # Transformers of depth 2 at input_blocks 4, 5 and output_blocks 3-5; of depth 10 at input_blocks 7, 8, the
    # middle block and output_blocks 0-2: 5 * 2 + 6 * 10 transformer blocks, each with two attentions and a GEGLU.
    heads = {g.name: (g.size // 2 // g.head_dim, g.head_dim) for g in spec.groups.values() if g.kind == "attention"}
    assert heads["unet.input_blocks.4.transformer.0.attn1.heads"] == (10, 64)
    assert heads["unet.middle_block.1.transformer.9.attn2.heads"] == (20, 64)
    assert heads["te.clip_l.layers.11.attn.heads"] == (12, 64)
    assert heads["te.clip_g.layers.31.attn.heads"] == (20, 64)
    assert spec.summary() == {
        "te.residual": 2, "te.attention": 12 + 32, "te.mlp_hidden": 12 + 32,
        "unet.time_hidden": 1, "unet.time_emb": 1, "unet.label_hidden": 1, "unet.residual": 16,
        "unet.resblock_inner": 17, "unet.transformer_inner": 11, "unet.attention": 2 * (5 * 2 + 6 * 10),
        "unet.ff_hidden": 5 * 2 + 6 * 10, "vae.residual": 12, "vae.resblock_inner": 24, "vae.attention": 2}
    # The concatenations at output_blocks 2, 3, 5 and 6 straddle GroupNorm(32) groups: both streams each of them
    # joins (the decoder's and the skip's) permute only inside intervals.
    straddled = sorted(g.name for g in spec.groups.values() if g.part == "unet" and g.structure.intervals)
    assert straddled == sorted([
        "unet.output_blocks.1.out", "unet.input_blocks.6",            # output_blocks.2: 1280 + 640
        "unet.output_blocks.2.upsample", "unet.input_blocks.4.out",   # output_blocks.3: 1280 + 640
        "unet.output_blocks.4.out", "unet.input_blocks.3",            # output_blocks.5: 640 + 320
        "unet.output_blocks.5.upsample", "unet.input_blocks.0"])      # output_blocks.6: 640 + 320
    # Each text encoder's stream owns its slice of every cross-attention's context input.
    k = f"{UNET}output_blocks.0.1.transformer_blocks.0.attn2.to_v.weight"
    assert [(s.group, s.length) for s in spec.axes[k][1]] == [("te.clip_l.residual", 768),
                                                              ("te.clip_g.residual", 1280)]
    # Fixed axes: ADM input, the pooled projection's output, latents, the timestep sinusoid.
    for key, axis in ((f"{UNET}label_emb.0.0.weight", 1), (f"{UNET}input_blocks.0.0.weight", 1),
                      (f"{UNET}time_embed.0.weight", 1), (f"{UNET}out.2.weight", 0)):
        assert [s.group for s in spec.axes[key][axis]] == [None], key
    assert 1 not in spec.axes[f"{CLIP_G}text_projection"]


@pytest.mark.parametrize("config", [
    SDXL_BASE, MINI, FILE_SCALE, replace(SDXL_BASE, unet_in_channels=9),
    replace(MINI, model_channels=128, channel_mult=(1, 2, 3, 4), transformer_depth=(0, 1, 2, 1), num_res_blocks=1),
    replace(MINI, clip_l_layers=11, clip_g_projection=64, adm_channels=64 + 6 * 32, vae_mult=(1, 2, 4)),
], ids=["base", "mini", "file", "inpainting", "four-levels", "other-widths"])
def test_hyper_parameters_are_read_from_shapes(config) -> None:
    shapes = build_spec(config).shapes
    assert detect(shapes) == config
    check_layout(config, shapes)


def test_optional_keys_may_be_missing() -> None:
    shapes = {k: s for k, s in build_spec(MINI).shapes.items() if k not in OPTIONAL}
    assert detect(shapes) == replace(MINI, clip_g_projection=MINI.clip_g_width)
    check_layout(MINI, shapes)


def _shapes_with(**edits: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    shapes = dict(build_spec(MINI).shapes)
    shapes.update({k.replace("__", "."): v for k, v in edits.items()})
    return shapes


def test_inconsistent_widths_are_refused() -> None:
    shapes = dict(build_spec(MINI).shapes)
    shapes[f"{UNET}input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"] = (128, 256)
    with pytest.raises(UnsupportedModelError, match="context width 256 is not CLIP-L's 128 plus CLIP-G's 192"):
        detect(shapes)
    odd = build_spec(replace(MINI, clip_l_width=96)).shapes  # 96-channel text encoder: not whole 64-channel heads
    with pytest.raises(UnsupportedModelError, match="64-channel heads"):
        detect(odd)
    refiner = {k.replace("embedders.1", "embedders.0"): s for k, s in build_spec(MINI).shapes.items()
               if not k.startswith(CLIP_L)}
    with pytest.raises(UnsupportedModelError, match="refiner"):
        detect(refiner)


def test_sd1_detection_still_names_sdxl() -> None:
    with pytest.raises(UnsupportedModelError, match="SDXL"):
        sd1_detect(build_spec(MINI).shapes)


# -- files ---------------------------------------------------------------------------------------------------------
def _sdxl_file(path: Path, config=FILE_SCALE, **kw) -> Path:
    return place(_cached(make_checkpoint, {"config": config, "seed": 3, **kw}), path)


def test_synthetic_file_round_trip(tmp_path: Path) -> None:
    marker = {"v_pred": torch.zeros(0, dtype=torch.int64)}
    path = _sdxl_file(tmp_path / "xl.safetensors", extra=marker)
    with open_checkpoint(path) as ck:
        shapes = ck.shapes()
        assert detect(shapes) == FILE_SCALE
        check_layout(FILE_SCALE, shapes)
        assert set(shapes) == set(build_spec(FILE_SCALE).shapes) | {"v_pred"}
        assert ck.get(f"{CLIP_L}embeddings.position_ids").dtype == torch.int64


def test_inspect_names_sdxl(tmp_path: Path) -> None:
    info = inspect_checkpoint(_sdxl_file(tmp_path / "xl.safetensors"))
    assert info.arch == "SDXL (reduced width: UNet 64, text encoders 128 + 192, VAE 32)"
    assert info.supported and info.error is None
    assert info.parts == {"te": 197 - 10 * 16 + 390 - 30 * 12, "unet": len([k for k in build_spec(FILE_SCALE).shapes
                                                                        if k.startswith(UNET)]), "vae": 248}
    inpaint = inspect_checkpoint(_sdxl_file(tmp_path / "inpaint.safetensors", replace(FILE_SCALE, unet_in_channels=9)))
    assert inpaint.arch.startswith("SDXL inpainting (")


@pytest.mark.parametrize("xl_slot", ["a", "b"])
def test_sd15_with_sdxl_is_refused_in_one_line_before_any_work(tmp_path: Path, tiny_models: dict[str, Path],
                                                                xl_slot: str) -> None:
    xl = _sdxl_file(tmp_path / "xl.safetensors")
    a, b = (xl, tiny_models["a"]) if xl_slot == "a" else (tiny_models["a"], xl)
    label = xl_slot.upper()
    with pytest.raises(IncompatibleModelsError) as e:
        merge_checkpoints(a, b, tmp_path / "out.safetensors", MergeOptions(method="weighted_sum"))
    arch = {"A": "SDXL", "B": "SD 1.x"} if label == "A" else {"A": "SD 1.x", "B": "SDXL"}
    assert str(e.value) == (f"Model A is {arch['A']} but model B is {arch['B']}; models of different "
                            "architectures cannot be merged.")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["xl.safetensors"]


def test_part_of_knows_both_architectures() -> None:
    """One `part_of` for SD 1.x and SDXL: every spec key lands in the part its walker put it in (both SDXL text
    encoders are the text encoder), and markers and unknown keys are 'other'."""
    from lib_rebasin.sd1.config import MINI as SD1_MINI
    from lib_rebasin.sd1.spec import build_spec as build_sd1_spec

    for spec in (build_spec(MINI), build_sd1_spec(SD1_MINI)):
        for key in spec.shapes:
            assert part_of(key) == spec.part_of_key[key], key
    assert {part_of(k) for k in build_spec(MINI).shapes if k.startswith("conditioner.embedders.")} == {"te"}
    assert part_of("v_pred") == part_of("edm_vpred.sigma_min") == part_of("model_ema.decay") == "other"
