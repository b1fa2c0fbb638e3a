"""The core's host-free forward pass (lib_rebasin.forward) equals diffusers' UNet2DConditionModel and
transformers' CLIPTextModel (tests/reference.py, loaded through diffusers' own LDM converters), and reports every
activation site activation matching reads."""

from __future__ import annotations

import pytest
import torch

from lib_rebasin import activation_matching as am
from lib_rebasin import forward
from lib_rebasin.arch import MINI
from lib_rebasin.spec import build_spec
from lib_rebasin.synthetic import synthetic_tensor

from reference import Reference, make_inputs, rel_max_error

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
