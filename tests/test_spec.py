"""The derived spec against facts about SD 1.5 that do not come from our code."""

from __future__ import annotations

import hashlib
import math
from dataclasses import replace
from pathlib import Path

import pytest

from lib_rebasin.archspec import Structure
from lib_rebasin.parts import part_of
from lib_rebasin.sd1.config import MINI, SD15
from lib_rebasin.sd1.spec import build_spec

SHARED_KEYS = Path(__file__).resolve().parents[2] / "shared" / "data" / "sd1-ldm-keys.yaml"


def test_full_layout_has_the_sd15_key_count_and_sizes() -> None:
    spec = build_spec(SD15)
    assert len(spec.shapes) == 1143
    params = dict.fromkeys(("unet", "te", "vae", "other"), 0)
    for k, s in spec.shapes.items():
        params[part_of(k)] += math.prod(s)
    assert params["unet"] == 859_520_964
    assert params["te"] == 123_060_480 + 77  # + position_ids
    assert params["vae"] == 83_653_863


# sha256 of "key:[shape]" lines (sorted, newline-joined) of the published SD 1.5 single-file key list
# (sd-mecha's sd1-ldm.yaml, EMA keys excluded), computed from shared/data/sd1-ldm-keys.yaml.
PUBLISHED_LAYOUT_SHA256 = "23c5d867f61e0ab49cd200eb15ead0f44edd4687c1f1bac2dda7a5a44aa10132"


def test_full_layout_matches_the_published_key_list_digest() -> None:
    lines = "\n".join(f"{k}:{list(v)}" for k, v in sorted(build_spec(SD15).shapes.items()))
    assert hashlib.sha256(lines.encode()).hexdigest() == PUBLISHED_LAYOUT_SHA256


@pytest.mark.skipif(not SHARED_KEYS.exists(), reason="shared/data/sd1-ldm-keys.yaml not beside the checkout")
def test_full_layout_equals_the_published_key_list() -> None:
    yaml = pytest.importorskip("yaml")
    data = yaml.safe_load(SHARED_KEYS.read_text())
    ref = {k: tuple(v["shape"]) for comp, keys in data["components"].items() if comp != "ema"
           for k, v in keys.items()}
    assert build_spec(SD15).shapes == ref


def test_unet_group_census() -> None:
    """77 channel groups (21 residual, 22 ResBlock inner, 16 transformer inner, 16 GEGLU hidden, 2 time),
    32 attention groups (8 heads each), 42 channel groups under GroupNorm, 4 concatenations straddling GroupNorm
    groups."""
    spec = build_spec(SD15)
    unet = [g for g in spec.groups.values() if g.part == "unet"]
    kinds: dict[str, int] = {}
    for g in unet:
        kinds[g.kind] = kinds.get(g.kind, 0) + 1
    assert kinds == {"residual": 21, "resblock_inner": 22, "transformer_inner": 16, "ff_hidden": 16,
                     "time_hidden": 1, "time_emb": 1, "attention": 32}
    assert all(g.structure.shared_blocks * SD15.unet_heads * 2 == g.size for g in unet if g.kind == "attention")
    assert sum(1 for g in unet if g.partitions) == 42
    # Streams entering the four straddling concatenations (output_blocks 5, 6, 8, 9): their partitions do not
    # nest, so only within-interval moves are legal.
    straddled = {g.name for g in unet if g.structure.intervals}
    assert {"unet.output_blocks.4.out", "unet.input_blocks.6", "unet.output_blocks.5.upsample",
            "unet.input_blocks.4.out", "unet.output_blocks.7.out", "unet.input_blocks.3",
            "unet.output_blocks.8.upsample", "unet.input_blocks.0"} == straddled
    # Where the stream's own GroupNorm blocks fit between the straddling cuts, they still move inside intervals.
    assert spec.groups["unet.input_blocks.0"].structure.levels == (10,)
    assert spec.groups["unet.output_blocks.4.out"].structure.levels == ()


def test_one_channel_groupnorm_blocks_constrain_nothing() -> None:
    """At width 32 with GroupNorm(32) each level-0 channel is its own normalisation group: no partition is
    recorded for it, so the level-0 streams are only limited by the concatenations' GroupNorms (width 64, 96)."""
    spec = build_spec(replace(MINI, model_channels=32))
    inner = spec.groups["unet.input_blocks.1.inner"]  # seen only by a one-channel-block GroupNorm
    assert not inner.partitions and inner.structure == Structure(32)
    stream = spec.groups["unet.input_blocks.0"]
    assert all(len(p) < 31 for p in stream.partitions)
    assert max(hi - lo for lo, hi in stream.structure.intervals) > 1  # no longer frozen channel by channel


def test_text_encoder_stream_feeds_every_cross_attention() -> None:
    spec = build_spec(SD15)
    te = spec.groups["te.residual"]
    kv = {s.key for s in te.slots if s.key.startswith("model.diffusion_model.")}
    assert len(kv) == 32 and all(k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for k in kv)


def test_fixed_axes_are_never_permuted() -> None:
    spec = build_spec(MINI)
    fixed = {
        "model.diffusion_model.input_blocks.0.0.weight": 1,   # latent input channels
        "model.diffusion_model.out.2.weight": 0,              # latent output channels
        "model.diffusion_model.time_embed.0.weight": 1,       # sinusoidal timestep features
        "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": 0,  # 77 positions
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": 0,     # token ids
        "first_stage_model.decoder.conv_out.weight": 0,       # RGB
        "first_stage_model.quant_conv.weight": 0,
    }
    for key, axis in fixed.items():
        assert all(seg.group is None for seg in spec.axes[key].get(axis, [])), key


def test_every_permutable_group_is_two_sided() -> None:
    """A group that only touches a producer (or only a consumer) would change the function. q/k groups are the
    exception that proves the rule: they permute the rows of both q and k, whose dot product is invariant."""
    spec = build_spec(MINI)
    for g in spec.groups.values():
        axes = {s.axis for s in g.slots if len(spec.shapes[s.key]) > 1}
        if g.kind == "attention":
            # Its first half (q/k) only has rows; the second half (v/o) has v rows and out-projection columns.
            half = g.size // 2
            qk = sorted(s.key.rsplit(".", 2)[-2] for s in g.slots if s.key.endswith("weight") and s.start == 0)
            assert all(s.length == half and s.start in (0, half) for s in g.slots), g.name
            assert {s.axis for s in g.slots if s.start == 0} == {0}, g.name
            assert {s.axis for s in g.slots if s.start == half and len(spec.shapes[s.key]) > 1} == {0, 1}, g.name
            assert qk in (["k_proj", "q_proj"], ["k", "q"], ["to_k", "to_q"]), g.name
        else:
            assert axes == {0, 1}, g.name
