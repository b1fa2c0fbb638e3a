"""The core's host-free SDXL forward pass (lib_rebasin.sdxl.forward) equals diffusers' UNet2DConditionModel
(`text_time`) and transformers' CLIPTextModel / CLIPTextModelWithProjection (tests/sdxl_reference.py, loaded through
diffusers' own single-file converters), at the reduced MINI scale, and reports every activation site activation
matching and REPAIR read.

At full SDXL size (opt-in: `pytest -m full`) the same comparison runs one part at a time (the text encoders, then
the UNet), and every layer output the pass reports (each activation-matching and REPAIR site among them) is
compared with the reference layer holding the same weight, besides the final outputs. The full-size UNet is 10 GB
of fp32, so the reference does not get its own copy: diffusers' converter only re-keys the single-file tensors, and
the meta-built UNet is loaded with `assign=True`, so both passes read the very same tensors (checked). The MINI
scale runs that path too, in CI."""

from __future__ import annotations

import resource
import time
from dataclasses import replace

import pytest
import torch
from reference import _storage, rel_max_error
from sdxl_reference import SDXLReference, make_inputs

from lib_rebasin.align import activation_matching as am
from lib_rebasin.align import repair
from lib_rebasin.errors import RebasinError
from lib_rebasin.forward_layers import Layers
from lib_rebasin.parts import UNET
from lib_rebasin.sdxl import forward
from lib_rebasin.sdxl.config import CLIP_G, CLIP_L, MINI, SDXL_BASE, SDXLConfig
from lib_rebasin.sdxl.spec import build_spec
from lib_rebasin.sdxl.synthetic import synthetic_tensor

TOL = 1e-5


@pytest.fixture(scope="module")
def mini():
    spec = build_spec(MINI)
    sd = {k: synthetic_tensor(k, s, 3) for k, s in spec.shapes.items()}
    ref = SDXLReference.build(MINI, ("unet", "te"))
    ref.load(sd, ("unet", "te"))
    return spec, sd, ref


def test_text_encoders_equal_transformers(mini) -> None:
    """Both encoders' penultimate hidden states (the context), CLIP-G's pooled projection, and each encoder's final
    normalised hidden state (so every layer, the last ones included, is checked)."""
    _, sd, ref = mini
    ids = make_inputs(MINI).ids
    layers = Layers(sd.__getitem__)
    want = ref.text(ids)
    cond = forward.text_encoder(MINI, layers, ids)
    assert rel_max_error(want["context"], cond.context) < TOL
    assert rel_max_error(want["pooled"], cond.pooled) < TOL
    _, last_l = forward.clip_l(MINI, layers, ids)
    assert rel_max_error(want["clip_l_last"], layers.layer_norm(f"{CLIP_L}final_layer_norm", last_l)) < TOL
    assert rel_max_error(want["clip_g_last"], forward.clip_g(MINI, layers, ids)[1]) < TOL


def test_per_encoder_ids(mini) -> None:
    """(batch, 2, positions) ids give each encoder its own row (the WebUI pads CLIP-G with 0, CLIP-L with EOS)."""
    _, sd, ref = mini
    ids = make_inputs(MINI).ids
    ids_g = ids.clone()
    ids_g[:, -20:] = 0
    layers = Layers(sd.__getitem__)
    both = forward.text_encoder(MINI, layers, torch.stack([ids, ids_g], dim=1))
    ref_g = ref.text(ids_g)
    assert rel_max_error(ref.text(ids)["context"][..., :MINI.clip_l_width], both.context[..., :MINI.clip_l_width]) < TOL
    assert rel_max_error(ref_g["context"][..., MINI.clip_l_width:], both.context[..., MINI.clip_l_width:]) < TOL
    assert rel_max_error(ref_g["pooled"], both.pooled) < TOL


def test_unet_equals_diffusers(mini) -> None:
    _, sd, ref = mini
    x = make_inputs(MINI, latent_size=16)
    time_ids = x.time_ids * torch.tensor([[1.0, 0.75, 1.0, 1.0, 1.0, 0.5]]) + torch.tensor([[0, 0, 32.0, 8.0, 0, 0]])
    ours = forward.unet(MINI, Layers(sd.__getitem__), x.latent, x.t, forward.Conditioning(x.context, x.pooled,
                                                                                          time_ids))
    assert rel_max_error(ref.eps(x.latent, x.t, x.context, x.pooled, time_ids), ours) < TOL


def test_text_to_unet_equals_reference(mini) -> None:
    _, sd, ref = mini
    x = make_inputs(MINI, latent_size=8)
    layers = Layers(sd.__getitem__)
    cond = forward.text_encoder(MINI, layers, x.ids)
    assert torch.equal(cond.sizes, x.time_ids)  # the data-free size conditioning is the reference inputs'
    ours = forward.unet(MINI, layers, x.latent, x.t, cond)
    assert rel_max_error(ref.end_to_end(x.latent, x.t, x.ids, x.time_ids), ours) < TOL


def test_rows_of_a_conditioning(mini) -> None:
    _, sd, _ = mini
    cond = forward.text_encoder(MINI, Layers(sd.__getitem__), make_inputs(MINI, batch=3).ids)
    two = cond[[2, 0]]
    assert torch.equal(two.context, cond.context[[2, 0]]) and torch.equal(two.pooled, cond.pooled[[2, 0]])
    assert torch.equal(two.sizes, cond.sizes[[2, 0]])


def _observed(sd, streams: bool = False) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    outs: dict[str, torch.Tensor] = {}
    layers = Layers(sd.__getitem__, lambda name, out: outs.__setitem__(name, out.clone()), streams=streams)
    x = make_inputs(MINI, latent_size=8)
    eps = forward.unet(MINI, layers, x.latent, x.t, forward.text_encoder(MINI, layers, x.ids))
    return outs, eps


def test_every_activation_site_is_observed(mini) -> None:
    """Each UNet and text-encoder group's activation-matching sites (CLIP-G's fused `in_proj` included) are layer
    outputs the forward pass reports, as wide as the spec's weight; every REPAIR site is reported."""
    spec, sd, _ = mini
    outs, _ = _observed(sd)
    width = {k: v.shape[1 if v.dim() == 4 else -1] for k, v in outs.items()}
    kinds = set()
    for g in spec.groups.values():
        if g.part == "vae":
            continue
        for s in am.sites(spec, g):
            layer = am.layer_of(s.key)
            assert layer in width, (g.name, layer)
            assert width[layer] == spec.shapes[s.key][0]
            kinds.add(g.kind)
    assert {"residual", "attention", "mlp_hidden", "label_hidden", "ff_hidden", "transformer_inner"} <= kinds
    assert f"{CLIP_G}transformer.resblocks.0.attn.in_proj" in width
    assert not [s for g in spec.groups.values() for s in am.sites(spec, g) if s.key.endswith("text_projection")]
    names = repair.sites(spec)
    assert names and set(names) <= set(width)
    assert any(n.endswith("proj_in") for n in names)


def test_streams_mode_observes_each_residual_sum(mini) -> None:
    """With streams=True a residual writer reports the stream after its addition: `label_emb`'s output joins the
    time embedding's `emb`, a linear proj_out adds to its transformer's input, CLIP-G's attention output to its
    stream; the model computes exactly the same thing."""
    _, sd, _ = mini
    writers, eps_w = _observed(sd)
    streams, eps_s = _observed(sd, streams=True)
    assert torch.equal(eps_w, eps_s)
    assert torch.allclose(streams[f"{UNET}label_emb.0.2"],
                          writers[f"{UNET}label_emb.0.2"] + writers[f"{UNET}time_embed.2"], atol=1e-6)
    p = f"{UNET}input_blocks.4.1"  # the first transformer (level 1)
    x = streams[f"{UNET}input_blocks.4.0.out_layers.3"]  # what the transformer adds to (no skip conv: a sum)
    b, ch, hh, ww = x.shape
    assert torch.allclose(streams[f"{p}.proj_out"], writers[f"{p}.proj_out"]
                          + x.permute(0, 2, 3, 1).reshape(b, hh * ww, ch), atol=1e-5)
    g0, g1 = (f"{CLIP_G}transformer.resblocks.{i}" for i in (0, 1))
    assert torch.allclose(streams[f"{g1}.attn.out_proj"], writers[f"{g1}.attn.out_proj"]
                          + streams[f"{g0}.mlp.c_proj"], atol=1e-5)
    for k in (f"{g0}.attn.in_proj", f"{UNET}label_emb.0.0", f"{p}.proj_in"):
        assert torch.equal(streams[k], writers[k]), k


def test_size_conditioning_reaches_the_unet(mini) -> None:
    """The size/crop values change the prediction (the ADM path is live, not dropped)."""
    _, sd, _ = mini
    x = make_inputs(MINI, latent_size=8)
    layers = Layers(sd.__getitem__)
    cond = forward.text_encoder(MINI, layers, x.ids)
    other = replace(cond, sizes=cond.sizes / 2)
    assert not torch.allclose(forward.unet(MINI, layers, x.latent, x.t, cond),
                              forward.unet(MINI, layers, x.latent, x.t, other))


def test_a_pruned_file_is_refused_in_one_line(mini) -> None:
    """A file without CLIP-G's optional `text_projection` (or `ln_final`) cannot give the UNet its pooled vector."""
    _, sd, _ = mini
    pruned = {k: v for k, v in sd.items() if k != f"{CLIP_G}text_projection"}
    with pytest.raises(RebasinError, match=r"^This SDXL model has no '.*text_projection' \(a pruned file\)") as err:
        forward.text_encoder(MINI, Layers(pruned.__getitem__), make_inputs(MINI).ids)
    assert "\n" not in str(err.value)


def test_matching_in_several_passes_gives_the_same_permutations(mini) -> None:
    """Correlation sums that do not fit one pass (full-size SDXL's) are collected in further passes over the same
    seeded inputs: the permutations are exactly those of one pass (the text encoders' groups, to keep it quick).
    Planned for the most each site can hold, they would take three passes; the counted rows show that the MLP sites
    keep only their rows, and two passes suffice."""
    spec, sd, _ = mini
    b = {k: synthetic_tensor(k, s, 4) for k, s in spec.shapes.items()}
    groups = [g for g in spec.groups.values() if g.part == "te"]
    budget = 8 << 20
    assert len(am.passes(spec, [g for g in groups if am.sites(spec, g)], budget)) == 3
    seen: list[str] = []

    def run(per_pass: int, progress=None):
        return am.activation_matching(spec, groups, sd.__getitem__, b.__getitem__, samples=1, seed=0, latent_size=8,
                                      sums_per_pass=per_pass, progress=progress)

    one = run(am.SUMS_PER_PASS)
    two = run(budget, lambda f, m: seen.append(f"{f:.3f} {m}"))
    assert one.keys() == two.keys() and len(one) == len([g for g in groups if am.sites(spec, g)])
    assert all(torch.equal(one[k], two[k]) for k in one)
    fractions = [float(s.split()[0]) for s in seen]
    assert fractions == sorted(fractions) and fractions[-1] < 1
    assert seen[0].endswith("(pass 1/2)") and seen[-1].endswith("(pass 2/2)")


def test_the_counted_rows_give_what_each_group_holds(mini) -> None:
    """`sums_bytes` with `layer_rows`' count is exactly what the group's sites hold after a pass once their pending
    rows are added in (a site with fewer rows than half its units holds only its rows), and never more than the
    bound; text encoder and UNet groups (the UNet at two latent sizes, 2 prompts: rows differ per level)."""
    spec, sd, _ = mini
    b = {k: synthetic_tensor(k, s, 4) for k, s in spec.shapes.items()}
    te = [g for g in spec.groups.values() if g.part == "te" and am.sites(spec, g)]
    unet = [g for g in spec.groups.values() if g.part == "unet" and am.sites(spec, g)]
    rows_only = 0
    for groups, latent in ((te + unet[::7], 8), (unet[3::11], 4)):
        rows = am.layer_rows(spec, b.__getitem__, samples=2, latent_size=latent)
        for given in (None, rows):  # sites growing batch by batch, or allocated for the counted rows
            corr = am.correlations(spec, groups, sd.__getitem__, b.__getitem__, samples=2, seed=0,
                                   latent_size=latent, rows=given)
            for g in groups:
                held = 0
                for site in corr[g.name].sites.values():
                    site.cross()  # adds pending rows into the cross sum where there is one
                    held += site.nbytes()
                    rows_only += site.sab is None
                assert held == am.sums_bytes(spec, g, rows) <= am.sums_bytes(spec, g), g.name
    assert rows_only > 0


# -- one part at a time, every layer output compared (the full-size check's path) ------------------------------------
def _signature(w: torch.Tensor) -> tuple:
    """A weight told apart by its shape and first values (every synthetic tensor is drawn from its own seed)."""
    return tuple(w.shape), tuple(w.reshape(-1)[:6].tolist())


def reference_layers(sd: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, list[str]]:
    """Each of our layers -> the reference modules computing its output, found by the weight they hold: the same
    tensor, a copy, or (CLIP-G's q, k and v) a third of the fused `in_proj` they were split from, in row order.
    The reference's only other conv/linear layer is CLIP-G's `text_projection`, a matrix product in our pass."""
    ours: dict[tuple, tuple[str, int]] = {}
    for key, w in sd.items():
        if w.dim() >= 2 and key.endswith("weight"):
            chunks = w.chunk(3) if key.endswith("in_proj_weight") else (w,)
            for i, chunk in enumerate(chunks):
                ours[_signature(chunk)] = (am.layer_of(key), i)
    found: dict[str, dict[int, str]] = {}
    left = []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear | torch.nn.Conv2d):
            hit = ours.get(_signature(m.weight))
            if hit is None:
                left.append(name)
            else:
                assert hit[1] not in found.setdefault(hit[0], {}), (hit, name)
                found[hit[0]][hit[1]] = name
    assert all(n.endswith("text_projection") for n in left), left[:5]
    return {layer: [by_row[i] for i in sorted(by_row)] for layer, by_row in found.items()}


class SiteErrors:
    """Hooks on the reference's layers keep their outputs; our pass's observer then takes each layer's relative
    max error against them (the reference's copy is dropped once compared)."""

    def __init__(self, sd: dict[str, torch.Tensor], models: dict[str, torch.nn.Module]) -> None:
        self.layers: dict[str, list[str]] = {}  # our layer -> its reference modules, as "model:module"
        self.outputs: dict[str, torch.Tensor] = {}
        self.errors: dict[str, float] = {}
        self.handles = []
        for label, model in models.items():  # both CLIP models name their layers alike: labelled apart
            modules = dict(model.named_modules())
            for layer, names in reference_layers(sd, model).items():
                assert layer not in self.layers, layer
                self.layers[layer] = [f"{label}:{n}" for n in names]
                for n in names:
                    self.handles.append(modules[n].register_forward_hook(self._keep(f"{label}:{n}")))

    def _keep(self, name: str):
        def hook(module: torch.nn.Module, args: object, out: torch.Tensor) -> None:
            assert name not in self.outputs, f"{name} ran twice"
            self.outputs[name] = out.detach().clone()
        return hook

    def stop(self) -> None:
        for h in self.handles:
            h.remove()

    def observe(self, name: str, out: torch.Tensor) -> None:
        assert name not in self.errors, f"{name} reported twice"
        want = torch.cat([self.outputs.pop(n) for n in self.layers[name]], dim=-1)
        assert want.shape == out.shape, (name, want.shape, out.shape)
        self.errors[name] = rel_max_error(want, out)

    def check_all_compared(self, spec, part: str) -> None:
        """Every reference layer's output was compared, every activation-matching and REPAIR site among them."""
        assert not self.outputs, f"reference layers not reported by our pass: {list(self.outputs)[:5]}"
        assert self.errors.keys() == self.layers.keys()
        sites = {am.layer_of(s.key) for g in spec.groups.values() if g.part == part for s in am.sites(spec, g)}
        if part == "unet":
            sites |= set(repair.sites(spec))
        assert sites and sites <= self.errors.keys(), sorted(sites - self.errors.keys())[:5]


def _worst(errors: dict[str, float]) -> tuple[str, float]:
    name = max(errors, key=errors.__getitem__)
    return name, errors[name]


def forward_errors(c: SDXLConfig, part: str, seed: int = 3, latent_size: int = 16) -> dict[str, float]:
    """Relative max errors of our pass against the reference for one part ("te": context, pooled projection, both
    final hidden states; "unet": the prediction under non-square size and crop values) and the worst of each
    layer's output, with only that part's weights made."""
    spec = build_spec(c)
    sd = {k: synthetic_tensor(k, s, seed) for k, s in spec.shapes.items() if spec.part_of_key[k] == part}
    ref = SDXLReference.build(c, (part,))
    ref.load(sd, (part,))
    x = make_inputs(c, latent_size=latent_size)
    if part == "unet":
        assert ref.unet is not None
        params = list(ref.unet.parameters())
        # The reference holds no weight of its own: every parameter is one of `sd`'s tensors (re-keyed), once.
        assert {_storage(p) for p in params} == {_storage(v) for v in sd.values()} and len(params) == len(sd)
        seen = SiteErrors(sd, {"unet": ref.unet})
        time_ids = x.time_ids * torch.tensor([[1.0, 0.75, 1.0, 1.0, 1.0, 0.5]]) + torch.tensor([[0, 0, 32.0, 8.0, 0,
                                                                                                 0]])
        want = ref.eps(x.latent, x.t, x.context, x.pooled, time_ids)
        seen.stop()
        ours = forward.unet(c, Layers(sd.__getitem__, seen.observe), x.latent, x.t,
                            forward.Conditioning(x.context, x.pooled, time_ids))
        out = {"eps": rel_max_error(want, ours)}
    else:
        assert ref.clip_l is not None and ref.clip_g is not None
        seen = SiteErrors(sd, {"clip_l": ref.clip_l, "clip_g": ref.clip_g})
        want = ref.text(x.ids)
        seen.stop()
        cond = forward.text_encoder(c, Layers(sd.__getitem__, seen.observe), x.ids)
        layers = Layers(sd.__getitem__)
        last_l = layers.layer_norm(f"{CLIP_L}final_layer_norm", forward.clip_l(c, layers, x.ids)[1])
        out = {"context": rel_max_error(want["context"], cond.context),
               "pooled": rel_max_error(want["pooled"], cond.pooled),
               "clip_l_last": rel_max_error(want["clip_l_last"], last_l),
               "clip_g_last": rel_max_error(want["clip_g_last"], forward.clip_g(c, layers, x.ids)[1])}
    seen.check_all_compared(spec, part)
    name, worst = _worst(seen.errors)
    return out | {f"worst of {len(seen.errors)} layers ({name})": worst}


def check_forward(c: SDXLConfig, part: str) -> None:
    start = time.perf_counter()
    errors = forward_errors(c, part)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    label = "full" if c.is_full_size else "mini"
    print(f"[{label}/{part}] {time.perf_counter() - start:.1f}s, peak RSS {rss:.2f} GiB, rel. max errors: "
          + ", ".join(f"{k}={v:.1e}" for k, v in errors.items()))
    bad = {k: v for k, v in errors.items() if not v < TOL}
    assert not bad, f"{label}/{part}: our forward pass differs from the reference (rel. max error > {TOL}): {bad}"


@pytest.mark.parametrize("part", ["te", "unet"])
def test_one_part_at_a_time_every_layer_at_small_scale(part: str) -> None:
    """The full-size check's own path (one part's weights, shared with a meta-built UNet; every layer compared)."""
    check_forward(MINI, part)


@pytest.mark.full
@pytest.mark.parametrize("part", ["te", "unet"])
def test_full_size_forward_equals_reference(part: str) -> None:
    check_forward(SDXL_BASE, part)
