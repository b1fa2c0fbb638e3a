"""The benchmark's activation-matching lever: collect unit activations of two models on the same noisy latents
(several t, every class context), match them with `lib_rebasin.align.activation_matching`, and write B permuted by the
result (function-preserving: checked by the caller) so that it can be merged through the ordinary API.

UNet sites see the noisy latents; text-encoder sites see the 11 class prompts (the encoder's whole input space).
"""

from __future__ import annotations

from collections import defaultdict

import torch

from lib_rebasin.align import activation_matching as am
from lib_rebasin.align.correlation import Correlation
from lib_rebasin.align.permute import Perms
from lib_rebasin.archspec import ArchSpec
from lib_rebasin.sd1.forward import channels_last
from lib_rebasin.sd1.spec import build_spec

from . import data, diffusion
from .layout import (
    NULL_CLASS,
    TE_PREFIX,
    UNET_PREFIX,
    class_tokens,
    load_unet,
    sd_config,
    text_encoder_from_ldm,
    unet_key_map,
)

MATCH_TIMESTEPS = (100, 300, 500, 700, 900)


def matching_inputs(n_images: int, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training images (not the held-out set), each noised at every MATCH_TIMESTEP: (x_t, t, labels)."""
    d = data.digits()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(d.train_y), generator=g)[:n_images]
    x0, y = data.encode(d.train_x[idx]), d.train_y[idx]
    xs, ts, ys = [], [], []
    for t in MATCH_TIMESTEPS:
        tt = torch.full((len(y),), t, dtype=torch.long)
        xs.append(diffusion.noisy(x0, tt, torch.randn(x0.shape, generator=g)))
        ts.append(tt)
        ys.append(y)
    return torch.cat(xs), torch.cat(ts), torch.cat(ys)


@torch.no_grad()
def activation_perms(width: int, ldm_a: dict, ldm_b: dict, n_images: int = 64, batch: int = 80) -> Perms:
    c = sd_config(width)
    spec = build_spec(c)
    groups = spec.groups_in(("unet", "te"))
    key_map = unet_key_map(c)
    te_prefixed = any(k.startswith("text_model.") for k in text_encoder_from_ldm(c, ldm_a).state_dict())
    # (model part, module name) -> [(group, site index, channel offset, units, first unit)]
    wanted: dict[tuple[str, str], list[tuple[str, int, int, int, int]]] = defaultdict(list)
    for g in groups:
        for i, s in enumerate(am.sites(spec, g)):
            if s.key.startswith(UNET_PREFIX):
                where = ("unet", key_map[s.key].rsplit(".", 1)[0])
            else:
                where = ("te", ("text_model." if te_prefixed else "") + s.key.removeprefix(TE_PREFIX).rsplit(".", 1)[0])
            wanted[where].append((g.name, i, s.offset, s.length, s.start))
    corr = {g.name: Correlation(g.size) for g in groups}

    def hook(model: torch.nn.Module, part: str, captured: dict) -> None:
        for name, module in model.named_modules():
            if (part, name) in wanted:
                module.register_forward_hook(
                    lambda _m, _i, out, key=(part, name): captured.__setitem__(key, out[0] if isinstance(out, tuple)
                                                                              else out))

    def update(outs: list[dict]) -> None:
        for where in outs[0]:
            fa, fb = channels_last(outs[0][where]), channels_last(outs[1][where])
            for name, site, off, n, start in wanted[where]:
                corr[name].update(site, fa[:, off:off + n], fb[:, off:off + n], start)

    models, te_outs = [], []
    prompts = class_tokens(c, torch.arange(NULL_CLASS + 1))
    for ldm in (ldm_a, ldm_b):
        te = text_encoder_from_ldm(c, ldm)
        captured: dict = {}
        hook(te, "te", captured)
        contexts = te(input_ids=prompts).last_hidden_state
        te_outs.append(dict(captured))
        unet = load_unet(c, ldm)
        captured = {}
        hook(unet, "unet", captured)
        models.append((unet, contexts, captured))
    update(te_outs)

    x, t, y = matching_inputs(n_images)
    for i in range(0, len(t), batch):
        outs = []
        for unet, ctx, captured in models:
            captured.clear()
            unet(x[i:i + batch], t[i:i + batch], encoder_hidden_states=ctx[y[i:i + batch]])
            outs.append(dict(captured))
        update(outs)
    return am.match(groups, corr)


def permuted_copy(spec: ArchSpec, ldm: dict, perms: Perms) -> dict:
    from lib_rebasin.align.permute import permute_tensor

    return {k: permute_tensor(spec, k, v, perms) for k, v in ldm.items()}
