"""SDXL block weights: the 20-value convention `BASE,IN00..IN08,M00,OUT00..OUT08`, checked key by key over the full
SDXL key list against a restatement that splits the key (not the rules' regular expressions); a merge that applies
them; what a named preset means for SDXL (SuperMerger's `weighttoxl`), key by key and in the metadata; the refusal of
the other architecture's count in one line before any work."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from lib_rebasin.errors import FieldError
from lib_rebasin.io.checkpoint import open_checkpoint
from lib_rebasin.merge.block_presets import PRESETS
from lib_rebasin.merge.block_weights import SD1, SDXL, BlockWeights, convention_for, for_architecture, parse_blocks
from lib_rebasin.merge.run import merge_checkpoints, merge_in_memory
from lib_rebasin.options import MergeOptions
from lib_rebasin.sdxl.config import SDXL_BASE
from lib_rebasin.sdxl.spec import build_spec

VALUES = tuple(round(0.05 * i, 2) for i in range(20))  # a distinct weight per block


def _expected_block(key: str) -> str:
    """sd-mecha's `convert_sdxl_blocks_to_sgm`, restated: the UNet's embeddings before the input blocks -> BASE,
    input/middle/output blocks by number, the final norm and conv -> OUT08; text encoders and VAE -> BASE."""
    if not key.startswith("model.diffusion_model."):
        assert key.startswith(("conditioner.embedders.", "first_stage_model.")), key
        return "BASE"
    part, *rest = key.removeprefix("model.diffusion_model.").split(".")
    if part in ("time_embed", "label_emb"):
        return "BASE"
    if part == "out":
        return "OUT08"
    if part == "middle_block":
        return "M00"
    return {"input_blocks": "IN", "output_blocks": "OUT"}[part] + f"{int(rest[0]):02d}"


def test_every_full_size_key_is_in_its_block() -> None:
    keys = build_spec(SDXL_BASE).shapes
    counts: Counter[str] = Counter()
    for key in keys:
        block = SDXL.block_of(key)
        assert block == _expected_block(key), key
        counts[block] += 1
    assert set(counts) == set(SDXL.ids) and len(SDXL.ids) == 20
    assert SDXL.ids[:2] == ("BASE", "IN00") and SDXL.ids[9:12] == ("IN08", "M00", "OUT00") and SDXL.ids[-1] == "OUT08"
    bw = BlockWeights(VALUES)
    assert convention_for(VALUES) is SDXL
    for key in keys:
        assert bw.alpha_of(key, -1.0) == VALUES[SDXL.index[_expected_block(key)]], key
    assert bw.alpha_of("v_pred", -1.0) == -1.0 and SDXL.block_of("model_ema.decay") is None


def test_parse_accepts_twenty_values() -> None:
    bw = parse_blocks(",".join(map(str, VALUES)), 0.5)
    assert bw.values == VALUES and bw.preset is None


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("sdxl_blocks")
    from model_cache import SDXL_SMALL, cached_sdxl_checkpoint  # read-only hard links into the model cache

    return (cached_sdxl_checkpoint(d / "a.safetensors", SDXL_SMALL, seed=1, base_seed=0),
            cached_sdxl_checkpoint(d / "b.safetensors", SDXL_SMALL, seed=2, base_seed=0))


def test_sdxl_merge_applies_each_blocks_weight(pair: tuple[Path, Path]) -> None:
    a_path, b_path = pair
    opts = MergeOptions(method="weighted_sum", precision="fp32").with_blocks(VALUES, None)
    out, diagnostics = merge_in_memory(a_path, b_path, opts)  # the tensors and metadata the file would hold
    with open_checkpoint(a_path) as a, open_checkpoint(b_path) as b:
        seen = set()
        for key in a:
            block = SDXL.block_of(key)
            if block is None or not a.get(key).is_floating_point():
                continue
            w = VALUES[SDXL.index[block]]
            torch.testing.assert_close(out.get(key), (1 - w) * a.get(key).float() + w * b.get(key).float(),
                                       rtol=0, atol=1e-6, msg=key)
            seen.add(block)
        assert seen == set(SDXL.ids)
        recipe = json.loads(out.metadata["sd_merge_recipe"])
    assert recipe["block_mapping"] == "sdxl-mbw-1" and recipe["blocks"] == list(VALUES)
    assert any(line.startswith("Block weights (BASE, IN00-IN08, M00, OUT00-OUT08): 0, 0.05, ")
               for line in diagnostics.summary_lines())


def test_sdxl_refuses_twenty_six_values(pair: tuple[Path, Path], tmp_path: Path) -> None:
    bw = parse_blocks("0.5," * 25 + "0.5", 0.5)
    opts = MergeOptions(method="weighted_sum").with_blocks(bw.values, bw.preset)
    with pytest.raises(FieldError, match=r"^Block weights for SDXL need 20 values \(BASE,IN00\.\.IN08,M00,"
                                         r"OUT00\.\.OUT08\); got 26\.$") as err:
        merge_checkpoints(*pair, tmp_path / "o.safetensors", opts)
    assert err.value.field == "blocks" and "\n" not in str(err.value) and not any(tmp_path.iterdir())


# SuperMerger's conversion of a preset for SDXL, as it is written there (`weighttoxl`, applied to the 25 UNet values
# after BASE): the first 9 input blocks, then M00 and the first 9 output blocks, then 0 for its VAE slot.
def _weighttoxl(unet: list[float]) -> list[float]:
    return unet[:9] + unet[12:22] + [0]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_read_for_sdxl_as_supermerger_does(name: str) -> None:
    values = PRESETS[name]
    ours = SDXL.preset_values(name)
    assert list(ours) == [values[0], *_weighttoxl(list(values[1:]))[:-1]]
    for block, v in zip(SDXL.ids, ours, strict=True):  # and by name: each block keeps its SD 1.x namesake's value
        assert v == values[SD1.index[block]], block
    assert for_architecture("SDXL", values, name) == ours
    assert for_architecture("SD 1.x", values, name) == values


def test_explicit_values_are_never_converted() -> None:
    with pytest.raises(FieldError, match="need 20 values"):
        for_architecture("SDXL", PRESETS["GRAD_V"], None)
    assert for_architecture("SDXL", VALUES, "GRAD_V") == VALUES  # 20 values recorded with their preset's name


def test_sdxl_merge_with_a_preset(pair: tuple[Path, Path]) -> None:
    """GRAD_V on an SDXL pair: every key gets the weight of its block's SD 1.x namesake, and the output records the
    preset, its 20 values, the key mapping and the preset's reading."""
    a_path, b_path = pair
    bw = parse_blocks("GRAD_V", 0.5)
    opts = MergeOptions(method="weighted_sum", precision="fp32").with_blocks(bw.values, bw.preset)
    out, _ = merge_in_memory(a_path, b_path, opts)  # the tensors and metadata the file would hold
    gradv = PRESETS["GRAD_V"]
    with open_checkpoint(a_path) as a, open_checkpoint(b_path) as b:
        for key in a:
            block = SDXL.block_of(key)
            if block is None or not a.get(key).is_floating_point():
                continue
            w = gradv[SD1.index[block]]
            torch.testing.assert_close(out.get(key), (1 - w) * a.get(key).float() + w * b.get(key).float(),
                                       rtol=0, atol=1e-6, msg=key)
        recipe = json.loads(out.metadata["sd_merge_recipe"])
        ours = json.loads(out.metadata["lib_rebasin"])
    for rec in (recipe, ours["recipe"]):
        assert rec["blocks_preset"] == "GRAD_V" and rec["blocks"] == list(SDXL.preset_values("GRAD_V"))
        assert rec["block_mapping"] == "sdxl-mbw-1" and rec["blocks_preset_mapping"] == "sdxl-presets-1"


def test_sd1_refuses_twenty_values(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    opts = MergeOptions(method="weighted_sum").with_blocks(VALUES, None)
    with pytest.raises(FieldError, match=r"^Block weights for SD 1\.x need 26 values \(BASE,IN00\.\.IN11,M00,"
                                         r"OUT00\.\.OUT11\); got 20\.$"):
        merge_checkpoints(tiny_models["a"], tiny_models["finetune"], tmp_path / "o.safetensors", opts)
    assert not any(tmp_path.iterdir())
