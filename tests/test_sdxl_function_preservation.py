"""SDXL function preservation, checked against an independent reference (diffusers + transformers, see
sdxl_reference.py), the way test_function_preservation.py checks SD 1.x.

A random-weight model with SDXL's single-file layout at the reduced MINI scale is permuted with random legal
permutations of the spec's groups; both models go through diffusers' single-file converters into strictly loaded
`UNet2DConditionModel` (SDXL's `text_time` addition embedding), `CLIPTextModel`, `CLIPTextModelWithProjection` and
`AutoencoderKL`, and their outputs must agree: rel(x, y) = max|x - y| / max|x| <= 1e-4, x the unpermuted output.

Outputs compared (batch of 2, fixed seeds):
- clip_l, clip_g: each encoder's final hidden state, equivariant under its own residual-stream permutation;
- conditioning: the UNet context (penultimate hidden states, CLIP-L then CLIP-G; equivariant under both streams'
  permutations) and CLIP-G's pooled projection (invariant: the projection space is fixed);
- unet: eps(latent, t, context, pooled, size/crop ids) for a fixed random context fed in the permuted order;
- te_to_unet: token ids -> both encoders -> UNet, end to end: invariant;
- vae_encode, vae_decode: invariant.
Negative controls show the check has teeth: a GroupNorm group split, a concatenation straddle ignored, q/k rows
moved across heads (UNet, CLIP-L, CLIP-G's fused in_proj), a head order that differs between q/k and v/o, and a
text encoder's stream left uncoupled from its slice of the UNet's context must each break the function.

At full SDXL size (opt-in: `pytest -m full`) two fp32 copies of the model do not fit in 24 GB (the UNet alone is
10 GB), so the check runs part by part with one model in memory at a time: its outputs are taken, the model is
freed, and the permuted model is regenerated key by key from the same seeds. The UNet part also permutes both text
encoders' residual streams (their slices of the UNet's context, fed in permuted order); with the text part's
equivariant conditioning that gives the end-to-end invariance the small-scale `te_to_unet` output checks whole.
"""

from __future__ import annotations

import dataclasses
import gc
import resource
import time
from dataclasses import dataclass

import pytest
import torch
from reference import rel_max_error
from sdxl_reference import SDXLInputs, SDXLReference, make_inputs
from test_function_preservation import head_order, with_axes

from lib_rebasin.align.permute import is_legal, permute_tensor, random_legal_perm, random_perms
from lib_rebasin.archspec import ArchSpec, Segment, Structure
from lib_rebasin.sdxl.config import MINI, SDXL_BASE, SDXLConfig
from lib_rebasin.sdxl.spec import build_spec
from lib_rebasin.sdxl.synthetic import synthetic_tensor

TOL = 1e-4
BROKEN = 10 * TOL
OUTPUTS = ("clip_l", "clip_g", "conditioning", "unet", "te_to_unet", "vae_encode", "vae_decode")
AFFECTED = {"unet": ("unet", "te_to_unet"), "te": ("clip_l", "clip_g", "conditioning", "unet", "te_to_unet"),
            "vae": ("vae_encode", "vae_decode")}
NEEDS = {"clip_l": ("te",), "clip_g": ("te",), "conditioning": ("te",), "unet": ("unet",),
         "te_to_unet": ("unet", "te"), "vae_encode": ("vae",), "vae_decode": ("vae",)}
L, G = "te.clip_l.residual", "te.clip_g.residual"


@dataclass
class Case:
    config: SDXLConfig
    spec: ArchSpec
    sd: dict[str, torch.Tensor]
    ref: SDXLReference
    inputs: SDXLInputs
    out_a: dict[str, torch.Tensor]


def parts_for(outputs: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(p for p in ("unet", "te", "vae") if any(p in NEEDS[o] for o in outputs))


def context_perm(c: SDXLConfig, perms: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The permutation of the UNet's context channels: CLIP-L's stream, then CLIP-G's."""
    if L not in perms and G not in perms:
        return None
    lp = perms.get(L, torch.arange(c.clip_l_width))
    gp = perms.get(G, torch.arange(c.clip_g_width))
    return torch.cat([lp, c.clip_l_width + gp])


def run_outputs(ref: SDXLReference, x: SDXLInputs, perms: dict[str, torch.Tensor],
                outputs: tuple[str, ...]) -> dict[str, torch.Tensor]:
    cp = context_perm(ref.config, perms)
    ctx = x.context if cp is None else x.context[..., cp]
    text = ref.text(x.ids) if any(NEEDS[o] == ("te",) for o in outputs) else {}
    run = {
        "clip_l": lambda: text["clip_l_last"],
        "clip_g": lambda: text["clip_g_last"],
        "conditioning": lambda: torch.cat([text["context"].flatten(1), text["pooled"]], dim=1),
        "unet": lambda: ref.eps(x.latent, x.t, ctx, x.pooled, x.time_ids),
        "te_to_unet": lambda: ref.end_to_end(x.latent, x.t, x.ids, x.time_ids),
        "vae_encode": lambda: ref.encode(x.image),
        "vae_decode": lambda: ref.decode(x.z),
    }
    return {name: run[name]() for name in outputs}


def expected(case: Case, name: str, perms: dict[str, torch.Tensor]) -> torch.Tensor:
    """The unpermuted model's output, in the permuted model's channel order where the output is equivariant."""
    a = case.out_a[name]
    c = case.config
    if name == "clip_l" and L in perms:
        return a[..., perms[L]]
    if name == "clip_g" and G in perms:
        return a[..., perms[G]]
    cp = context_perm(c, perms)
    if name == "conditioning" and cp is not None:
        n = c.text_positions * c.context_dim
        ctx = a[:, :n].reshape(a.shape[0], c.text_positions, c.context_dim)[..., cp]
        return torch.cat([ctx.flatten(1), a[:, n:]], dim=1)
    return a


def make_case(config: SDXLConfig, outputs: tuple[str, ...] = OUTPUTS) -> Case:
    spec = build_spec(config)
    sd = {k: synthetic_tensor(k, s, 0) for k, s in spec.shapes.items()}
    parts = parts_for(outputs)
    ref = SDXLReference.build(config, parts)
    ref.load(sd, parts)
    inputs = make_inputs(config)
    return Case(config, spec, sd, ref, inputs, run_outputs(ref, inputs, {}, outputs))


def errors(case: Case, perms: dict[str, torch.Tensor], spec: ArchSpec | None = None,
           outputs: tuple[str, ...] | None = None) -> dict[str, float]:
    spec = spec or case.spec
    if outputs is None:
        touched = {spec.part_of_key[s.key] for n in perms for s in spec.groups[n].slots}
        outputs = tuple(o for o in OUTPUTS if any(o in AFFECTED[p] for p in touched))
    parts = parts_for(outputs)
    case.ref.load({k: permute_tensor(spec, k, v, perms) for k, v in case.sd.items()
                   if spec.part_of_key[k] in parts}, parts)
    out_b = run_outputs(case.ref, case.inputs, perms, outputs)
    for name, value in out_b.items():
        assert torch.isfinite(value).all(), name
    return {name: rel_max_error(expected(case, name, perms), out_b[name]) for name in outputs}


def assert_preserved(case: Case, perms: dict[str, torch.Tensor], label: str,
                     outputs: tuple[str, ...] | None = None) -> dict[str, float]:
    for name, p in perms.items():
        assert is_legal(case.spec.groups[name].structure, p), f"an illegal perm was drawn for {name}"
    errs = errors(case, perms, outputs=outputs)
    bad = {k: v for k, v in errs.items() if v > TOL}
    assert not bad, f"{label}: function not preserved (rel. max error > {TOL}): {bad}; all: {errs}"
    return errs


def _broken(case: Case, perms: dict[str, torch.Tensor], spec: ArchSpec | None = None,
            outputs: tuple[str, ...] = ("unet", "te_to_unet")) -> None:
    errs = errors(case, perms, spec, outputs)
    print(f"wrong permutation: rel. max errors {errs}")
    assert max(errs.values()) > BROKEN, f"wrong permutation went undetected: {errs}"


def assert_heads_reordered(groups: list, perms: dict[str, torch.Tensor]) -> None:
    """Most drawn permutations reorder whole heads, not only channels inside heads. With two to four heads per
    attention at this scale a random head order is the identity often (1 in 2 for two heads), so the bar is
    half of the multi-head attentions; the whole-head tests below reorder every attention kind on purpose."""
    multi = [g for g in groups if g.kind == "attention" and g.size // 2 > g.head_dim]
    reordered = [g for g in multi if not torch.equal(head_order(perms[g.name], g.head_dim),
                                                     torch.arange(g.size // 2 // g.head_dim))]
    assert len(reordered) >= len(multi) / 2, f"only {len(reordered)}/{len(multi)} attentions reorder heads"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def mini() -> Case:
    return make_case(MINI)


PART_SETS = {"all": ("unet", "te", "vae"), "unet": ("unet",), "te": ("te",), "vae": ("vae",)}


@pytest.mark.parametrize("which", list(PART_SETS))
def test_random_legal_permutations_preserve_function(mini: Case, which: str) -> None:
    groups = [g for g in mini.spec.groups.values() if g.part in PART_SETS[which]]
    kinds = {g.kind for g in groups}
    perms = random_perms(groups, seed=7)
    moved = sum(not torch.equal(p, torch.arange(len(p))) for p in perms.values())
    assert moved >= 0.9 * len(perms), f"only {moved}/{len(perms)} groups actually permuted"
    assert_heads_reordered(groups, perms)
    errs = assert_preserved(mini, perms, which)
    print(f"[{which}] {len(perms)} groups of kinds {sorted(kinds)}, rel. max errors: "
          + ", ".join(f"{k}={v:.1e}" for k, v in errs.items()))


def test_every_group_kind_is_drawn(mini: Case) -> None:
    """The random permutations above cover every kind of group the SDXL spec has."""
    kinds = {(g.part, g.kind) for g in mini.spec.groups.values()}
    assert kinds == {("unet", k) for k in ("residual", "resblock_inner", "transformer_inner", "attention",
                                           "ff_hidden", "time_hidden", "time_emb", "label_hidden")} | {
        ("te", k) for k in ("residual", "attention", "mlp_hidden")} | {
        ("vae", k) for k in ("residual", "resblock_inner", "attention")}


def test_another_seed_all_parts(mini: Case) -> None:
    assert_preserved(mini, random_perms(mini.spec.groups.values(), seed=8), "all/seed=8")


def test_inpainting_unet_is_preserved() -> None:
    cfg = dataclasses.replace(MINI, unet_in_channels=9)
    case = make_case(cfg, outputs=("unet", "te_to_unet"))
    assert case.ref.unet.conv_in.in_channels == 9 and case.inputs.latent.shape[1] == 9
    perms = random_perms([g for g in case.spec.groups.values() if g.part in ("unet", "te")], seed=11)
    assert_preserved(case, perms, "inpainting", outputs=("unet", "te_to_unet"))


# -- negative controls -------------------------------------------------------------------------------------------
def test_groupnorm_group_split_is_detected(mini: Case) -> None:
    g = mini.spec.groups["unet.input_blocks.4.out"]
    block = g.size // MINI.gn_groups
    perm = torch.arange(g.size)
    perm[[0, block]] = perm[[block, 0]]
    assert not is_legal(g.structure, perm)
    _broken(mini, {g.name: perm}, outputs=("unet",))


def test_concat_groupnorm_ignored_is_detected(mini: Case) -> None:
    """A spec that knows the stream's own GroupNorm but not the decoder concatenation that straddles it
    (`input_blocks.6` is concatenated at `output_blocks.2`)."""
    g = mini.spec.groups["unet.input_blocks.6"]
    naive = Structure(g.size, levels=(g.size // MINI.gn_groups,))
    perm = random_legal_perm(naive, torch.Generator().manual_seed(3))
    assert is_legal(naive, perm) and not is_legal(g.structure, perm)
    _broken(mini, {g.name: perm}, outputs=("unet",))


ATTENTIONS = ["unet.input_blocks.7.transformer.1.attn2", "unet.output_blocks.4.transformer.0.attn1",
              "te.clip_l.layers.0.attn", "te.clip_g.layers.1.attn"]


@pytest.mark.parametrize("attn", ATTENTIONS)
def test_cross_head_qk_perm_is_detected(mini: Case, attn: str) -> None:
    g = mini.spec.groups[f"{attn}.heads"]
    d = g.head_dim
    assert d == 64 and g.size // 2 > d
    perm = torch.arange(g.size)
    perm[[1, d + 2]] = perm[[d + 2, 1]]  # one q/k row of head 0 <-> one of head 1
    assert not is_legal(g.structure, perm)
    _broken(mini, {g.name: perm})


@pytest.mark.parametrize("attn", ATTENTIONS)
def test_whole_head_reorder_preserves_function(mini: Case, attn: str) -> None:
    g = mini.spec.groups[f"{attn}.heads"]
    d, half = g.head_dim, g.size // 2
    gen = torch.Generator().manual_seed(4)
    heads = torch.arange(half // d).flip(0)
    perm = torch.cat([lo + h * d + torch.randperm(d, generator=gen) for lo in (0, half) for h in heads])
    assert is_legal(g.structure, perm) and torch.equal(head_order(perm, d), heads)
    assert_preserved(mini, {g.name: perm}, f"{attn} heads reversed")


@pytest.mark.parametrize("attn", ATTENTIONS)
def test_head_order_that_differs_between_qk_and_vo_is_detected(mini: Case, attn: str) -> None:
    g = mini.spec.groups[f"{attn}.heads"]
    d, half = g.head_dim, g.size // 2
    heads = torch.arange(half // d).flip(0)
    perm = torch.cat([h * d + torch.arange(d) for h in heads] + [torch.arange(half, g.size)])
    assert not is_legal(g.structure, perm)
    _broken(mini, {g.name: perm})


@pytest.mark.parametrize("stream", [L, G])
def test_text_encoder_uncoupled_from_its_context_slice_is_detected(mini: Case, stream: str) -> None:
    """A spec that permutes a text encoder's stream but leaves the UNet's `attn2.to_k/to_v` columns alone."""
    unet_keys = {s.key for s in mini.spec.groups[stream].slots if mini.spec.part_of_key[s.key] == "unet"}
    assert unet_keys and all(k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for k in unet_keys)
    edits = {k: {1: [Segment(None, seg.length) if seg.group == stream else seg
                     for seg in mini.spec.axes[k][1]]} | {a: lay for a, lay in mini.spec.axes[k].items() if a != 1}
             for k in unet_keys}
    perm = random_legal_perm(mini.spec.groups[stream].structure, torch.Generator().manual_seed(9))
    _broken(mini, {stream: perm}, with_axes(mini.spec, edits), outputs=("te_to_unet",))


def test_geglu_halves_permuted_apart_is_detected(mini: Case) -> None:
    """The GEGLU projection's value and gate halves with different permutations (the gate then scales another
    unit's value)."""
    name = "unet.middle_block.1.transformer.1.ff"
    key = "model.diffusion_model.middle_block.1.transformer_blocks.1.ff.net.0.proj"
    g = mini.spec.groups[name]
    edits = {f"{key}.{s}": {0: [Segment(name, g.size), Segment(None, g.size)]} |
             {a: lay for a, lay in mini.spec.axes[f"{key}.{s}"].items() if a != 0} for s in ("weight", "bias")}
    perm = torch.randperm(g.size, generator=torch.Generator().manual_seed(5))
    _broken(mini, {name: perm}, with_axes(mini.spec, edits), outputs=("unet",))


# -- full SDXL size (opt-in: pytest -m full) ---------------------------------------------------------------------
FULL_PARTS = {"unet": (("unet",), ("unet",)), "te": (("te",), ("clip_l", "clip_g", "conditioning")),
              "vae": (("vae",), ("vae_encode", "vae_decode"))}


def lean_outputs(config: SDXLConfig, spec: ArchSpec, parts: tuple[str, ...], inputs: SDXLInputs,
                 perms: dict[str, torch.Tensor], outputs: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The outputs of the (permuted) model, built from the seed-0 synthetic weights key by key; nothing of the
    model is kept after the call."""
    ref = SDXLReference.build(config, parts)
    ref.load({k: permute_tensor(spec, k, synthetic_tensor(k, s, 0), perms) for k, s in spec.shapes.items()
              if spec.part_of_key[k] in parts}, parts)
    out = run_outputs(ref, inputs, perms, outputs)
    del ref
    gc.collect()
    return out


def check_part_by_part(config: SDXLConfig, which: str) -> None:
    start = time.perf_counter()
    parts, outputs = FULL_PARTS[which]
    spec = build_spec(config)
    groups = [g for g in spec.groups.values() if g.part in parts]
    perms = random_perms(groups, seed=7)
    if which == "unet":
        perms |= random_perms([spec.groups[L], spec.groups[G]], seed=8)
    for name, p in perms.items():
        assert is_legal(spec.groups[name].structure, p), name
    moved = sum(not torch.equal(p, torch.arange(len(p))) for p in perms.values())
    assert moved >= 0.9 * len(perms), f"only {moved}/{len(perms)} groups actually permuted"
    assert_heads_reordered(groups, perms)
    inputs = make_inputs(config)
    out_a = lean_outputs(config, spec, parts, inputs, {}, outputs)
    out_b = lean_outputs(config, spec, parts, inputs, perms, outputs)
    case = Case(config, spec, {}, SDXLReference(config, None, None, None, None), inputs, out_a)
    errs = {}
    for name in outputs:
        assert torch.isfinite(out_b[name]).all() and out_a[name].abs().max() > 0, name
        errs[name] = rel_max_error(expected(case, name, perms), out_b[name])
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    label = "full" if config.is_full_size else "mini"
    print(f"[{label}/{which}] {len(perms)} groups, {time.perf_counter() - start:.1f}s, peak RSS {rss:.1f} GiB, "
          "rel. max errors: " + ", ".join(f"{k}={v:.1e}" for k, v in errs.items()))
    bad = {k: v for k, v in errs.items() if v > TOL}
    assert not bad, f"{label}/{which}: function not preserved (rel. max error > {TOL}): {bad}"


@pytest.mark.parametrize("which", list(FULL_PARTS))
def test_part_by_part_check_at_small_scale(which: str) -> None:
    """The full-size check's own path (one model at a time, regenerated from seeds), run at the MINI scale."""
    check_part_by_part(MINI, which)


@pytest.mark.full
@pytest.mark.parametrize("which", list(FULL_PARTS))
def test_full_size_random_legal_permutations_preserve_function(which: str) -> None:
    check_part_by_part(SDXL_BASE, which)
