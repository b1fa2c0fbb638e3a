"""The benchmark's REPAIR lever (Jordan et al., "REPAIR: REnormalizing Permuted Activations for Interpolation
Repair", ICLR 2023): after interpolating, rescale and shift each channel of chosen layers' outputs in the merged
model so that its mean and std over a calibration set equal the interpolation of the parents' statistics, then
fold that per-channel affine map into the layer's weight and bias, so the result is an ordinary checkpoint.

For a site (a Conv2d/Linear with a bias) with per-channel statistics mu_A, sd_A of A, mu_B, sd_B of B (aligned to
A, so channel c means the same unit in both) and mu_M, sd_M of the merge (measured with every upstream
correction already applied), at interpolation weight alpha:

    target mean  mu_T = (1 - alpha) mu_A + alpha mu_B,   target std  sd_T = (1 - alpha) sd_A + alpha sd_B
    y' = (y - mu_M) * sd_T / sd_M + mu_T   ->   W'[c] = s[c] W[c],  b'[c] = s[c] (b[c] - mu_M[c]) + mu_T[c]

(the formula and the folding are the core's, `lib_rebasin.align.repair`; the paper's interpolated-statistics target; its "reset" BatchNorm computed in one forward pass is the same as
measuring every site on one batch that holds the whole calibration set, which is what `corrected` does).

Which sites (`SITES`):
- "residual": layers whose output is written into a residual stream or is the model's output, with no
  normalisation in between: conv_in, each ResBlock's conv2 and 1x1 shortcut, each transformer's proj_in (its
  inner stream) and proj_out, attention outputs, the feed-forward output, down/upsamplers, conv_out. Every other
  layer of the SD UNet feeds a GroupNorm/LayerNorm, which removes most of a per-channel rescale.
- "inner": "residual" without conv_out (the output keeps the merge's own scale).
- "all": every Conv2d/Linear with a bias (q, k, v have none).
- "output": conv_out only (what the loss sees).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from lib_rebasin.align import repair as core
from lib_rebasin.sd1.forward import channels_last

from .layout import sd_config

_RESIDUAL = re.compile(r"(^conv_in$|^conv_out$|\.resnets\.\d+\.conv2$|\.resnets\.\d+\.conv_shortcut$|"
                       r"\.attentions\.\d+\.proj_(in|out)$|\.attn[12]\.to_out\.0$|\.ff\.net\.2$|"
                       r"\.(down|up)samplers\.\d+\.conv$)")
SITES = ("residual", "inner", "all", "output")
EPS = 1e-6


def site_names(unet: torch.nn.Module, where: str) -> list[str]:
    layers = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
              and m.bias is not None]
    if where == "all":
        return layers
    if where == "residual":
        return [n for n in layers if _RESIDUAL.search(n)]
    if where == "inner":
        return [n for n in layers if _RESIDUAL.search(n) and n != "conv_out"]
    if where == "output":
        return ["conv_out"]
    raise ValueError(f"unknown REPAIR sites {where!r}; one of {', '.join(SITES)}")


ChannelStats = core.Stats


def _stats(out: torch.Tensor) -> ChannelStats:
    f = channels_last(out)
    st = core.Stats(f.shape[1])
    st.update(f)
    return st


@dataclass(frozen=True)
class Calibration:
    """The inputs every model is measured on: noisy training latents, their timesteps and class labels."""
    x: torch.Tensor
    t: torch.Tensor
    labels: torch.Tensor


def calibration(n_images: int = 64) -> Calibration:
    from .activations import matching_inputs

    return Calibration(*matching_inputs(n_images))


@torch.no_grad()
def site_stats(width: int, ldm: dict, names: list[str], cal: Calibration) -> dict[str, ChannelStats]:
    """Per-channel statistics of each site's output over the whole calibration set (one batch)."""
    from .evaluate import Model

    model = Model(width, ldm)
    out: dict[str, ChannelStats] = {}
    modules = dict(model.unet.named_modules())
    handles = [modules[n].register_forward_hook(lambda _m, _i, y, n=n: out.__setitem__(n, _stats(y)))
               for n in names]
    try:
        model.eps(cal.x, cal.t, cal.labels)
    finally:
        for h in handles:
            h.remove()
    return out


@torch.no_grad()
def corrected(width: int, sa: dict[str, ChannelStats], sb: dict[str, ChannelStats], ldm_m: dict, alpha: float,
              where: str, cal: Calibration) -> tuple[dict, dict[str, float]]:
    """The merge `ldm_m` (of A and aligned B at `alpha`) with REPAIR folded into the weights of the `where` sites,
    given A's and aligned B's `site_stats` (at least at those sites); also each site's mean sd_M / sd_T as the
    pass reached it (the variance collapse it repaired)."""
    from .evaluate import Model
    from .layout import unet_to_ldm

    # A copy: the model's parameters are the state dict's own tensors (loaded with assign=True), and folding writes
    # into them.
    model = Model(width, {k: v.clone() for k, v in ldm_m.items()})
    names = site_names(model.unet, where)
    modules = dict(model.unet.named_modules())
    affine: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    collapse: dict[str, float] = {}

    def fix(name: str, y: torch.Tensor) -> torch.Tensor:
        sm = _stats(y)
        scale, shift = core.correction(sa[name], sb[name], sm, alpha)
        affine[name] = (scale, shift)
        sd_t = (1 - alpha) * sa[name].std + alpha * sb[name].std
        collapse[name] = float((sm.std / (sd_t + EPS)).mean())
        ch = 1 if y.dim() == 4 else -1
        shape = [1] * y.dim()
        shape[ch] = -1
        return (y.double() * scale.view(shape) + shift.view(shape)).to(y.dtype)

    # One batch = the whole calibration set, every site corrected as the forward pass reaches it, so each site's
    # statistics are measured with the upstream corrections already in place (REPAIR's reset layers).
    handles = [modules[n].register_forward_hook(lambda _m, _i, y, n=n: fix(n, y)) for n in names]
    try:
        hooked = model.eps(cal.x, cal.t, cal.labels)
    finally:
        for h in handles:
            h.remove()
    for n, (scale, shift) in affine.items():
        m = modules[n]
        w, bias = core.fold(m.weight, m.bias, scale, shift)
        m.weight.copy_(w)
        m.bias.copy_(bias)
    # Folding is exact up to fp32 rounding; a larger difference means a site was hooked but not folded. (Checked
    # on the first samples: every sample goes through every site.)
    k = min(32, len(cal.t))
    folded = model.eps(cal.x[:k], cal.t[:k], cal.labels[:k])
    err = float((folded - hooked[:k]).abs().max() / hooked[:k].abs().max())
    if err > 1e-3:
        raise RuntimeError(f"REPAIR folding changed the output by {err:.2e} (relative)")
    out = dict(ldm_m)
    out.update(unet_to_ldm(sd_config(width), model.unet.state_dict()))
    return out, collapse


def collapse_profile(sa: dict[str, ChannelStats], sb: dict[str, ChannelStats], sm: dict[str, ChannelStats],
                     alpha: float) -> dict[str, float]:
    """Site -> mean over channels of sd_M / sd_T for the uncorrected merge M (1 = no collapse, below 1 = the
    merge's activations are narrower than the interpolation of A's and aligned B's)."""
    names = list(sm)
    return {n: float((sm[n].std / ((1 - alpha) * sa[n].std + alpha * sb[n].std + EPS)).mean()) for n in names}
