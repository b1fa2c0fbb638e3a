"""Function preservation, checked against an independent reference (diffusers + transformers, see reference.py).

A random-weight model with the exact SD 1.x layout is permuted with random *legal* permutations of the spec's
groups; both models go through diffusers' LDM converters into strictly loaded `UNet2DConditionModel`,
`AutoencoderKL` and `CLIPTextModel`, and their outputs must agree to fp32 tolerance:

    relative max error  rel(x, y) = max|x - y| / max|x|  <= 1e-4,   x = output of the unpermuted model.

Outputs compared (batch of 2, fixed seeds):
- text_encoder: token ids -> last hidden state. Its channels are the `te.residual` stream, so the permuted model
  must give the original output with that permutation applied (equivariance), not the same tensor.
- unet: eps(latent, t, context) for a fixed random context, fed in the permuted model's `te.residual` order.
- te_to_unet: ids -> text encoder -> UNet, end to end: must be invariant.
- vae_encode (posterior mean and log-variance) and vae_decode: must be invariant.

Negative controls show the check has teeth: deliberately wrong permutations (GroupNorm group split, a head mixed
with another, a one-sided permutation) must give large errors.
"""

from __future__ import annotations

import dataclasses
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from reference import Inputs, Reference, make_inputs, rel_max_error

from lib_rebasin.align.permute import is_legal, permute_tensor, random_legal_perm, random_perms
from lib_rebasin.archspec import ArchSpec, Structure
from lib_rebasin.sd1.config import MINI, SD15, SD1Config
from lib_rebasin.sd1.spec import build_spec
from lib_rebasin.sd1.synthetic import synthetic_tensor

TOL = 1e-4
# A negative control must miss the tolerance by far (legal permutations stay near 1e-6), not by noise.
BROKEN = 10 * TOL
OUTPUTS = ("text_encoder", "unet", "te_to_unet", "vae_encode", "vae_decode")
# Which outputs each model part's groups can affect (the text encoder's stream also feeds the UNet's
# cross-attention), and which parts' weights each output needs.
AFFECTED = {"unet": ("unet", "te_to_unet"), "te": ("text_encoder", "unet", "te_to_unet"),
            "vae": ("vae_encode", "vae_decode")}
NEEDS = {"text_encoder": ("te",), "unet": ("unet",), "te_to_unet": ("unet", "te"),
         "vae_encode": ("vae",), "vae_decode": ("vae",)}


@dataclass
class Case:
    config: SD1Config
    spec: ArchSpec
    sd: dict[str, torch.Tensor]
    ref: Reference
    inputs: Inputs
    out_a: dict[str, torch.Tensor]


def random_state_dict(spec: ArchSpec, seed: int = 0) -> dict[str, torch.Tensor]:
    return {k: synthetic_tensor(k, s, seed, None, 0.0, spec.config.timesteps) for k, s in spec.shapes.items()}


def permuted(spec: ArchSpec, sd: dict[str, torch.Tensor], perms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: permute_tensor(spec, k, v, perms) for k, v in sd.items()}


def run_outputs(ref: Reference, x: Inputs, te_perm: torch.Tensor | None,
                outputs: tuple[str, ...] = OUTPUTS) -> dict[str, torch.Tensor]:
    ctx = x.context if te_perm is None else x.context[..., te_perm]
    run = {
        "text_encoder": lambda: ref.text(x.ids),
        "unet": lambda: ref.eps(x.latent, x.t, ctx),
        "te_to_unet": lambda: ref.end_to_end(x.latent, x.t, x.ids),
        "vae_encode": lambda: ref.encode(x.image),
        "vae_decode": lambda: ref.decode(x.z),
    }
    return {name: run[name]() for name in outputs}


def parts_for(outputs: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(p for p in ("unet", "te", "vae") if any(p in NEEDS[o] for o in outputs))


def make_case(config: SD1Config, latent_size: int = 16, image_size: int = 32, seed: int = 0,
              sd: dict[str, torch.Tensor] | None = None, outputs: tuple[str, ...] = OUTPUTS) -> Case:
    spec = build_spec(config)
    sd = sd if sd is not None else random_state_dict(spec, seed)
    parts = parts_for(outputs)
    ref = Reference.build(config, parts)
    ref.load(sd, parts)
    inputs = make_inputs(config, latent_size=latent_size, image_size=image_size)
    return Case(config, spec, sd, ref, inputs, run_outputs(ref, inputs, None, outputs))


def errors(case: Case, perms: dict[str, torch.Tensor], spec: ArchSpec | None = None,
           outputs: tuple[str, ...] | None = None) -> dict[str, float]:
    """Load the permuted model into the reference and return rel. max error per output (vs. the original).

    By default only the outputs that the permuted groups' parts can affect are computed."""
    spec = spec or case.spec
    if outputs is None:
        touched = {spec.part_of_key[s.key] for n in perms if n in spec.groups for s in spec.groups[n].slots}
        outputs = tuple(o for o in OUTPUTS if any(o in AFFECTED[p] for p in touched)) or OUTPUTS
    parts = parts_for(outputs)
    case.ref.load({k: permute_tensor(spec, k, v, perms) for k, v in case.sd.items()
                   if spec.part_of_key.get(k) in parts}, parts)
    te_perm = perms.get("te.residual")
    out_b = run_outputs(case.ref, case.inputs, te_perm, outputs)
    errs = {}
    for name in outputs:
        a = case.out_a[name]
        if name == "text_encoder" and te_perm is not None:
            a = a[..., te_perm]
        assert torch.isfinite(out_b[name]).all(), name
        errs[name] = rel_max_error(a, out_b[name])
    return errs


def culprits(case: Case, perms: dict[str, torch.Tensor], outputs: tuple[str, ...] | None = None) -> list[str]:
    """Bisect a failing permutation set down to the groups that break preservation on their own."""
    def fails(names: list[str]) -> bool:
        errs = errors(case, {n: perms[n] for n in names})
        return max(v for k, v in errs.items() if outputs is None or k in outputs) > TOL

    def rec(names: list[str]) -> list[str]:
        if len(names) == 1:
            return names
        half = len(names) // 2
        found = [n for part in (names[:half], names[half:]) if fails(part) for n in rec(part)]
        return found or names  # only fails in combination: report the whole set

    return rec(sorted(perms))


def assert_preserved(case: Case, perms: dict[str, torch.Tensor], label: str,
                     outputs: tuple[str, ...] | None = None) -> dict[str, float]:
    for name, p in perms.items():
        assert is_legal(case.spec.groups[name].structure, p), f"random_perms drew an illegal perm for {name}"
    moved = sum(not torch.equal(p, torch.arange(len(p))) for p in perms.values())
    assert moved >= 0.9 * len(perms), f"only {moved}/{len(perms)} groups actually permuted"
    errs = errors(case, perms, outputs=outputs)
    bad = {k: v for k, v in errs.items() if v > TOL}
    if bad:
        pytest.fail(f"{label}: function not preserved (rel. max error > {TOL}): {bad}; all: {errs}; "
                    f"culprit groups: {culprits(case, perms, outputs)}")
    return errs


def head_order(perm: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Which head of B each head of A takes (from the q/k half of an attention group's permutation)."""
    return perm[:len(perm) // 2:head_dim] // head_dim


def assert_heads_reordered(groups: list, perms: dict[str, torch.Tensor]) -> None:
    """The drawn permutations reorder whole heads (not only channels inside heads) in most multi-head attentions,
    so that a preservation test covers the head symmetry."""
    multi = [g for g in groups if g.kind == "attention" and g.size // 2 > g.head_dim]
    if not multi:
        return
    reordered = [g for g in multi if not torch.equal(head_order(perms[g.name], g.head_dim),
                                                     torch.arange(g.size // 2 // g.head_dim))]
    assert len(reordered) >= 0.9 * len(multi), f"only {len(reordered)}/{len(multi)} attentions reorder heads"


def groups_of(spec: ArchSpec, parts: tuple[str, ...]) -> list:
    return [g for g in spec.groups.values() if g.part in parts]


def with_axes(spec: ArchSpec, edits: dict[str, dict[int, list]]) -> ArchSpec:
    """A copy of `spec` whose axis layouts for some keys are replaced ({} / missing axis = not permuted)."""
    axes = {k: dict(v) for k, v in spec.axes.items()}
    for key, layout in edits.items():
        axes[key] = layout
    return dataclasses.replace(spec, axes=axes)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are small: one intra-op thread is as fast, and immune to OpenMP spin-wait thrashing on a
    loaded CI box (measured here: 2 threads on a busy 2-core machine made this file ~8x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- mini scale (CI) ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mini() -> Case:
    return make_case(MINI)


PART_SETS = {"all": ("unet", "te", "vae"), "unet": ("unet",), "te": ("te",), "vae": ("vae",)}


@pytest.mark.parametrize("which", list(PART_SETS))
def test_random_legal_permutations_preserve_function(mini: Case, which: str) -> None:
    groups = groups_of(mini.spec, PART_SETS[which])
    assert groups
    perms = random_perms(groups, seed=7)
    b = permuted(mini.spec, mini.sd, perms)
    changed = sum(not torch.equal(b[k], v) for k, v in mini.sd.items())
    assert changed > 0.5 * sum(mini.spec.part_of_key[k] in PART_SETS[which] for k in mini.sd)
    assert_heads_reordered(groups, perms)
    errs = assert_preserved(mini, perms, which)
    print(f"[{which}] {len(perms)} groups, rel. max errors: " + ", ".join(f"{k}={v:.1e}" for k, v in errs.items()))


@pytest.mark.parametrize("seed", [8, 9])
def test_more_seeds_all_parts(mini: Case, seed: int) -> None:
    assert_preserved(mini, random_perms(mini.spec.groups.values(), seed=seed), f"all/seed={seed}")


def test_tested_layout_is_the_real_sd15_layout() -> None:
    """diffusers' converter is lenient (e.g. an upsample conv at `.1` or `.2`), so a misnamed key would still
    load. Pin the layout these tests run on to the independent SD 1.5 key list in ../shared/data."""
    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "sd1-ldm-keys.yaml"
    if not path.exists():
        pytest.skip(f"{path} not available")
    yaml = pytest.importorskip("yaml")
    data = yaml.safe_load(path.read_text())
    want = {k: tuple(v["shape"]) for comp, keys in data["components"].items() if comp != "ema"
            for k, v in keys.items()}
    got = build_spec(SD15).shapes
    assert sorted(set(want) ^ set(got)) == []
    assert {k: (got[k], s) for k, s in want.items() if got[k] != s} == {}


def test_inpainting_unet_is_preserved(mini: Case) -> None:
    cfg = dataclasses.replace(MINI, unet_in_channels=9)
    spec = build_spec(cfg)
    changed = {k for k, s in spec.shapes.items() if s != mini.spec.shapes[k]}
    assert changed == {"model.diffusion_model.input_blocks.0.0.weight"}, changed
    sd = {k: mini.sd[k] if k not in changed else synthetic_tensor(k, s, 0, None, 0.0, cfg.timesteps)
          for k, s in spec.shapes.items()}
    case = make_case(cfg, sd=sd, outputs=("unet", "te_to_unet"))
    assert case.ref.unet.conv_in.in_channels == 9 and case.inputs.latent.shape[1] == 9
    perms = random_perms(groups_of(case.spec, ("unet", "te")), seed=11)
    assert_preserved(case, perms, "inpainting", outputs=("unet", "te_to_unet"))


def _cut_refinement(size: int, partitions: set) -> Structure:
    """The structure the spec used to give straddled streams: channels only inside the common refinement."""
    bounds = sorted({c for p in partitions for c in p} | {0, size})
    return Structure(size, intervals=tuple(zip(bounds[:-1], bounds[1:])))


def test_groupnorm_blocks_move_between_straddling_cuts(mini: Case) -> None:
    """A straddled stream whose own GroupNorm blocks fit between the concatenations' cuts moves those blocks."""
    g = mini.spec.groups["unet.input_blocks.0"]
    assert g.structure.levels and g.structure.intervals
    perm = random_legal_perm(g.structure, torch.Generator().manual_seed(2))
    assert not is_legal(_cut_refinement(g.size, g.partitions), perm)  # moves blocks, not only channels
    assert_preserved(mini, {g.name: perm}, "blocks inside intervals", outputs=("unet",))


def test_one_channel_groupnorm_width_is_preserved() -> None:
    """Width 32 with GroupNorm(32): the level-0 GroupNorms normalise single channels and constrain nothing, so the
    level-0 groups take any permutation their concatenations allow (they used to be frozen channel by channel)."""
    case = make_case(dataclasses.replace(MINI, model_channels=32), outputs=("unet",))
    groups = groups_of(case.spec, ("unet",))
    perms = random_perms(groups, seed=3)
    inner = case.spec.groups["unet.input_blocks.1.inner"]
    assert inner.structure == Structure(inner.size)
    stream = case.spec.groups["unet.input_blocks.0"]
    assert not is_legal(_cut_refinement(stream.size, stream.partitions | {tuple(range(1, stream.size))}),
                        perms[stream.name])
    assert_preserved(case, perms, "width 32", outputs=("unet",))


# -- negative controls: a wrong spec must fail the check ---------------------------------------------------------
def _broken(case: Case, perms: dict[str, torch.Tensor], spec: ArchSpec | None = None,
            outputs: tuple[str, ...] = ("unet", "te_to_unet")) -> dict[str, float]:
    errs = errors(case, perms, spec, outputs)
    print(f"wrong permutation: rel. max errors {errs}")
    assert max(errs.values()) > BROKEN, f"wrong permutation went undetected: {errs}"
    return errs


@pytest.mark.parametrize("group, output", [("unet.input_blocks.4.out", "unet"),
                                           ("vae.encoder.down.1.block.0.out", "vae_encode"),
                                           ("vae.decoder.up.2.upsample", "vae_decode")])
def test_groupnorm_group_split_is_detected(mini: Case, group: str, output: str) -> None:
    """Swap two channels of one residual stream that sit in different GroupNorm groups (otherwise consistent)."""
    g = mini.spec.groups[group]
    block = g.size // mini.config.gn_groups
    perm = torch.arange(g.size)
    perm[[0, block]] = perm[[block, 0]]
    assert not is_legal(g.structure, perm)
    _broken(mini, {g.name: perm}, outputs=(output,))


def test_concat_groupnorm_ignored_is_detected(mini: Case) -> None:
    """A spec that only knows the stream's own GroupNorm, not the decoder concatenation that straddles it."""
    g = mini.spec.groups["unet.input_blocks.6"]
    naive = Structure(g.size, levels=(g.size // mini.config.gn_groups,))
    perm = random_legal_perm(naive, torch.Generator().manual_seed(3))
    assert is_legal(naive, perm) and not is_legal(g.structure, perm)
    _broken(mini, {g.name: perm}, outputs=("unet",))


def test_unconstrained_residual_perm_is_detected(mini: Case) -> None:
    """A spec that ignores GroupNorm altogether: any permutation of every UNet residual stream."""
    gen = torch.Generator().manual_seed(5)
    perms = {g.name: torch.randperm(g.size, generator=gen) for g in mini.spec.groups.values()
             if g.part == "unet" and g.kind == "residual"}
    assert not all(is_legal(mini.spec.groups[n].structure, p) for n, p in perms.items())
    _broken(mini, perms, outputs=("unet",))


ATTENTIONS = ["unet.input_blocks.1.transformer.attn1", "unet.output_blocks.3.transformer.attn2", "te.layers.0.attn"]


@pytest.mark.parametrize("attn", ATTENTIONS)
def test_cross_head_qk_perm_is_detected(mini: Case, attn: str) -> None:
    """q/k rows moved between heads (same perm on q and k, so only the head boundary is violated)."""
    g = mini.spec.groups[f"{attn}.heads"]
    d = g.head_dim
    perm = torch.arange(g.size)
    perm[[1, d + 2]] = perm[[d + 2, 1]]  # one q/k row of head 0 <-> one of head 1
    assert not is_legal(g.structure, perm)
    _broken(mini, {g.name: perm})


@pytest.mark.parametrize("attn", ATTENTIONS)
def test_whole_head_reorder_preserves_function(mini: Case, attn: str) -> None:
    """Heads reversed in both halves (q/k and v/o), with independent permutations inside each head's halves."""
    g = mini.spec.groups[f"{attn}.heads"]
    d, half = g.head_dim, g.size // 2
    gen = torch.Generator().manual_seed(4)
    heads = torch.arange(half // d).flip(0)
    perm = torch.cat([lo + h * d + torch.randperm(d, generator=gen) for lo in (0, half) for h in heads])
    assert is_legal(g.structure, perm) and torch.equal(head_order(perm, d), heads)
    assert_preserved(mini, {g.name: perm}, f"{attn} heads reversed")


@pytest.mark.parametrize("attn", ATTENTIONS)
def test_head_order_that_differs_between_qk_and_vo_is_detected(mini: Case, attn: str) -> None:
    """Heads reordered in the q/k half only: each head's scores then weight another head's values."""
    g = mini.spec.groups[f"{attn}.heads"]
    d, half = g.head_dim, g.size // 2
    heads = torch.arange(half // d).flip(0)
    perm = torch.cat([h * d + torch.arange(d) for h in heads] + [torch.arange(half, g.size)])
    assert not is_legal(g.structure, perm)
    _broken(mini, {g.name: perm})


@pytest.mark.parametrize("group", ["unet.input_blocks.1.inner", "te.layers.0.mlp"])
def test_one_sided_perm_is_detected(mini: Case, group: str) -> None:
    """Producer rows permuted, the consumer's input columns left alone."""
    g = mini.spec.groups[group]
    consumers = {s.key for s in g.slots if s.axis == 1}
    assert consumers
    edits = {k: {a: lay for a, lay in mini.spec.axes[k].items() if a != 1} for k in consumers}
    perm = random_legal_perm(g.structure, torch.Generator().manual_seed(9))
    _broken(mini, {group: perm}, with_axes(mini.spec, edits))


# -- full SD 1.5 size (opt-in: pytest -m full) ------------------------------------------------------------------
@pytest.fixture(scope="module")
def full() -> Case:
    return make_case(SD15, latent_size=16, image_size=32)


@pytest.mark.full
@pytest.mark.parametrize("which", list(PART_SETS))
def test_full_size_random_legal_permutations_preserve_function(full: Case, which: str) -> None:
    start = time.perf_counter()
    groups = groups_of(full.spec, PART_SETS[which])
    perms = random_perms(groups, seed=7)
    assert_heads_reordered(groups, perms)
    errs = assert_preserved(full, perms, f"full/{which}")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"[full/{which}] {len(perms)} groups, {time.perf_counter() - start:.1f}s, peak RSS {rss:.1f} GiB, "
          "rel. max errors: " + ", ".join(f"{k}={v:.1e}" for k, v in errs.items()))
