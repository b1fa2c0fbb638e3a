"""The core's host-free forward pass (lib_rebasin.sd1.forward) equals diffusers' UNet2DConditionModel and
transformers' CLIPTextModel (tests/reference.py, loaded through diffusers' own LDM converters), and reports every
activation site activation matching reads."""

from __future__ import annotations

import pytest
import torch
from reference import Reference, make_inputs, rel_max_error

from lib_rebasin.align import activation_matching as am
from lib_rebasin.parts import UNET
from lib_rebasin.sd1 import forward
from lib_rebasin.sd1.config import MINI
from lib_rebasin.sd1.spec import TE, build_spec
from lib_rebasin.sd1.synthetic import synthetic_tensor

TOL = 1e-5


@pytest.fixture(scope="module")
def mini():
    spec = build_spec(MINI)
    sd = {k: synthetic_tensor(k, s, 3, None, 0.0, MINI.timesteps) for k, s in spec.shapes.items()}
    ref = Reference.build(MINI, ("unet", "te"))
    ref.load(sd, ("unet", "te"))
    return spec, sd, ref


def test_text_encoder_equals_transformers(mini) -> None:
    spec, sd, ref = mini
    ids = make_inputs(MINI).ids
    ours = forward.text_encoder(MINI, forward.Layers(sd.__getitem__), ids)
    assert rel_max_error(ref.text(ids), ours) < TOL


def test_unet_equals_diffusers(mini) -> None:
    spec, sd, ref = mini
    x = make_inputs(MINI, latent_size=16)
    ours = forward.unet(MINI, forward.Layers(sd.__getitem__), x.latent, x.t, x.context)
    assert rel_max_error(ref.eps(x.latent, x.t, x.context), ours) < TOL


def test_text_to_unet_equals_reference(mini) -> None:
    spec, sd, ref = mini
    x = make_inputs(MINI, latent_size=8)
    layers = forward.Layers(sd.__getitem__)
    ours = forward.unet(MINI, layers, x.latent, x.t, forward.text_encoder(MINI, layers, x.ids))
    assert rel_max_error(ref.end_to_end(x.latent, x.t, x.ids), ours) < TOL


def test_every_activation_site_is_observed(mini) -> None:
    """Each UNet and text-encoder group's sites are layer outputs the forward pass reports, with the width the
    spec gives that layer's weight (so a group's channel window is where the spec says)."""
    spec, sd, _ = mini
    seen: dict[str, int] = {}
    layers = forward.Layers(sd.__getitem__, lambda name, out: seen.__setitem__(name, out.shape[1 if out.dim() == 4
                                                                                                else -1]))
    x = make_inputs(MINI, latent_size=8)
    forward.unet(MINI, layers, x.latent, x.t, forward.text_encoder(MINI, layers, x.ids))
    for g in spec.groups.values():
        if g.part == "vae":
            continue
        for s in am.sites(spec, g):
            layer = s.key.removesuffix(".weight")
            assert layer in seen, (g.name, layer)
            assert seen[layer] == spec.shapes[s.key][0]


def test_streams_mode_observes_each_residual_sum(mini) -> None:
    """With streams=True a layer that adds into a residual stream reports the stream after its addition (what
    activation matching correlates), a ResBlock's skip convolution is not reported on its own (its sum is), every
    other layer reports the same output, and the model computes exactly the same thing."""
    spec, sd, _ = mini
    x = make_inputs(MINI, latent_size=8)

    def run(streams: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        outs: dict[str, torch.Tensor] = {}
        layers = forward.Layers(sd.__getitem__, lambda name, out: outs.__setitem__(name, out.clone()), streams=streams)
        eps = forward.unet(MINI, layers, x.latent, x.t, forward.text_encoder(MINI, layers, x.ids))
        return outs, eps

    writers, eps_w = run(False)
    streams, eps_s = run(True)
    assert torch.equal(eps_w, eps_s)
    unet, te = UNET, f"{TE}encoder.layers."
    block = f"{unet}input_blocks.1"              # ResBlock without a skip convolution, then a transformer
    # A plain ResBlock adds its second convolution to its input: input blocks 0 (conv_in) -> 1.
    assert torch.allclose(streams[f"{block}.0.out_layers.3"],
                          writers[f"{block}.0.out_layers.3"] + writers[f"{unet}input_blocks.0.0"], atol=1e-6)
    t = f"{block}.1.transformer_blocks.0"
    # The transformer's own stream: attn1's output projection adds to proj_in's tokens.
    tokens = writers[f"{block}.1.proj_in"]
    tokens = tokens.permute(0, 2, 3, 1).reshape(tokens.shape[0], -1, tokens.shape[1])
    assert torch.allclose(streams[f"{t}.attn1.to_out.0"], writers[f"{t}.attn1.to_out.0"] + tokens, atol=1e-6)
    # Skip convolutions are one term of their block's sum: only the sum is reported.
    skips = [k for k in writers if k.endswith(".skip_connection")]
    assert skips and not any(k in streams for k in skips)
    for k in skips:
        p = k.removesuffix(".skip_connection")
        assert torch.allclose(streams[f"{p}.out_layers.3"], writers[f"{p}.out_layers.3"] + writers[k], atol=1e-5)
    # The text encoder's streams: layer 1's attention output adds to layer 0's stream after its MLP.
    assert torch.allclose(streams[f"{te}1.self_attn.out_proj"], writers[f"{te}1.self_attn.out_proj"]
                          + streams[f"{te}0.mlp.fc2"], atol=1e-5)
    # Layers that write no stream (q/k/v, convolutions inside a ResBlock, conv_in) report the same outputs.
    for k in (f"{block}.0.in_layers.2", f"{t}.attn1.to_q", f"{unet}input_blocks.0.0", f"{te}0.mlp.fc1"):
        assert torch.equal(streams[k], writers[k]), k
    assert set(streams) == set(writers) - set(skips)
