"""REPAIR: a statistics correction after merging (Jordan, Sedghi, Saukh, Entezari, Neyshabur, "REPAIR:
REnormalizing Permuted Activations for Interpolation Repair", ICLR 2023).

Interpolating two aligned networks shrinks the spread of their units' activations ("variance collapse"). REPAIR
maps each channel c of a chosen layer's output in the merge M back to the interpolation of the parents':

    mu_T = (1 - alpha) mu_A + alpha mu_B        sd_T = (1 - alpha) sd_A + alpha sd_B
    y'   = (y - mu_M) * s + mu_T,  s = sd_T / sd_M
    W'[c] = s[c] W[c],   b'[c] = s[c] b[c] + (mu_T[c] - s[c] mu_M[c])

(B already aligned to A, so channel c is the same unit in both). The correction is folded into the layer's weight
and bias, so the result is an ordinary checkpoint.

`corrections` is the merge option (`MergeOptions.repair`): it runs A, aligned B and the merge with the core's own
forward pass of their architecture (`sd1/forward.py`, `sdxl/forward.py`) on the inputs activation matching uses
(`sd1/activation_inputs.py`, `sdxl/activation_inputs.py`: seeded prompts, A's DDIM trajectory), and corrects the
UNet's residual writers (`SITE`). The merge runs once over the whole calibration set as one batch, correcting each
site as it is reached, so every site's statistics already include the upstream corrections (what the paper's
"reset" BatchNorm layers compute). `Stats`, `correction` and `fold` are also used on their own by the benchmark
lever (benchmarks/quality/repair.py).
Measured on the quality benchmark (benchmarks/quality/LEVERS.md, RESULTS.md): it depends on width and alignment.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..archspec import ArchSpec
from ..errors import RebasinError
from ..forward_layers import Layers, TensorGetter, channels_last
from ..io.model_input import ModelConfig
from ..parts import UNET, part_of
from ..sd1 import activation_inputs as inputs
from .forward_support import check_forward_supported, forward_of

EPS = 1e-6


class Stats:
    """Running per-channel mean and (population) std of a layer's outputs, fed as (samples, channels) batches."""

    def __init__(self, channels: int) -> None:
        self.channels = channels
        self.n = 0
        self.sum = torch.zeros(channels, dtype=torch.float64)
        self.sumsq = torch.zeros(channels, dtype=torch.float64)

    def update(self, x: torch.Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != self.channels:
            raise ValueError(f"REPAIR statistics expect (samples, {self.channels}) activations, got "
                             f"{tuple(x.shape)}")
        x = x.double()
        if self.sum.device != x.device:
            self.sum, self.sumsq = self.sum.to(x.device), self.sumsq.to(x.device)
        self.n += x.shape[0]
        self.sum += x.sum(0)
        self.sumsq += (x * x).sum(0)

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self._count()

    @property
    def std(self) -> torch.Tensor:
        m = self.mean
        return (self.sumsq / self._count() - m * m).clamp_min(0).sqrt()

    def _count(self) -> int:
        if self.n == 0:
            raise ValueError("REPAIR statistics of a layer that saw no activations")
        return self.n


def correction(a: Stats, b: Stats, merged: Stats, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) per channel: y' = scale * y + shift gives the merge's channels the target mean and std."""
    if not (a.channels == b.channels == merged.channels):
        raise ValueError(f"REPAIR statistics disagree on the channel count: A {a.channels}, B {b.channels}, "
                         f"merge {merged.channels}")
    mu_t = (1 - alpha) * a.mean + alpha * b.mean
    sd_t = (1 - alpha) * a.std + alpha * b.std
    # A channel the merge leaves (nearly) constant is only shifted: dividing by its std would blow up noise.
    # No epsilon in the other channels' ratio, so that a merge already at its target is left exactly as it is.
    sd_m = merged.std
    scale = torch.where(sd_m > EPS, sd_t / sd_m.clamp_min(EPS), torch.ones_like(sd_m))
    return scale, mu_t - scale * merged.mean


def fold(weight: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor,
         shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A conv/linear layer's (weight, bias) with y' = scale * y + shift applied to its outputs (axis 0)."""
    if weight.shape[0] != scale.shape[0] or bias.shape != (weight.shape[0],):
        raise ValueError(f"cannot fold a {scale.shape[0]}-channel correction into weight {tuple(weight.shape)} "
                         f"and bias {tuple(bias.shape)}")
    return fold_weight(weight, scale), fold_bias(bias, scale, shift)


def fold_weight(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    s = scale.to(weight.device, torch.float64)
    return (weight.double() * s.view(-1, *([1] * (weight.dim() - 1)))).to(weight.dtype)


def fold_bias(bias: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    return (bias.double() * scale.to(bias.device, torch.float64) + shift.to(bias.device, torch.float64)
            ).to(bias.dtype)


# -- the merge option ------------------------------------------------------------------------------------------
# The UNet layers corrected: every conv/linear whose output is written into a residual stream (or is the model's
# output) with no normalisation in between: conv_in (input_blocks.0.0), each ResBlock's second conv (out_layers.3)
# and 1x1 skip, each transformer's proj_in (its inner stream) and proj_out, the attention outputs, the feed-forward
# output, the down/upsamplers and conv_out (out.2). Every other layer feeds a GroupNorm/LayerNorm, which undoes
# most of a per-channel rescale. All of these have a bias, so the correction folds. This is the benchmark's
# "residual" site set (benchmarks/quality/LEVERS.md compares it with the others).
SITE = re.compile(r"(^input_blocks\.0\.0|\.out_layers\.3|\.skip_connection|\.proj_in|\.proj_out|\.to_out\.0|"
                  r"\.ff\.net\.2|\.op|\.\d+\.conv|^out\.2)$")


def sites(spec: ArchSpec[Any]) -> list[str]:
    """The layers (checkpoint keys without `.weight`) REPAIR corrects, in the spec's key order."""
    out = []
    for key in spec.shapes:
        name = key.removesuffix(".weight")
        if (key.endswith(".weight") and part_of(key) == "unet" and SITE.search(name.removeprefix(UNET))
                and f"{name}.bias" in spec.shapes and len(spec.shapes[key]) >= 2):
            out.append(name)
    return out


def check_supported(a: ModelConfig, b: ModelConfig) -> None:
    check_forward_supported(a, b, "REPAIR", "Merge it without REPAIR.")


@dataclass(frozen=True)
class Calibration:
    """What all three models see: the prompts, and each input's latent x_t, timestep and prompt row."""
    ids: torch.Tensor       # (samples + 1, ...): seeded prompts' ids, then the empty prompt's
    x: torch.Tensor         # (inputs, channels, h, w)
    t: torch.Tensor         # (inputs,)
    prompt: torch.Tensor    # (inputs,) row of `ids` each input is conditioned on


@torch.no_grad()
def calibration(c: ModelConfig, get_a: TensorGetter, samples: int, seed: int, device: torch.device,
                latent_size: int = inputs.LATENT_SIZE,
                on_step: Callable[[int, int], None] | None = None) -> Calibration:
    """Activation matching's inputs (the same seed gives the same prompts and starting noise): model A's DDIM
    trajectory under classifier-free guidance; every step's x_t once with its prompt, once with the empty one."""
    gen = torch.Generator().manual_seed(seed)
    fwd = forward_of(c)
    ids = fwd.prompts(c, samples, gen).to(device)
    x = inputs.noise(c, samples, gen, latent_size).to(device)
    layers = Layers(get_a, None, device)
    ctx = fwd.text_encoder(c, layers, ids)
    rows = torch.cat([torch.arange(samples), torch.full((samples,), samples)]).to(device)
    xs, ts = [], []

    def guided_eps(k: int, t: int, x: torch.Tensor) -> torch.Tensor:
        # The whole calibration set in one batch: every prompt's x_t, then the same x_t with the empty prompt.
        if on_step is not None:
            on_step(k, len(inputs.TIMESTEPS))
        xx = torch.cat([x, x])
        tt = torch.full((2 * samples,), t, dtype=torch.long, device=device)
        xs.append(xx)
        ts.append(tt)
        return inputs.guided(fwd.unet(c, layers, xx, tt, ctx[rows]), samples)

    inputs.ddim_trajectory(c, x, guided_eps)
    n = len(inputs.TIMESTEPS)
    return Calibration(ids, torch.cat(xs), torch.cat(ts), rows.repeat(n))


Correct = Callable[[str, Stats], tuple[torch.Tensor, torch.Tensor]]


@torch.no_grad()
def site_stats(c: ModelConfig, get: TensorGetter, cal: Calibration, names: list[str], device: torch.device,
               correct: Correct | None = None, on_site: Callable[[int, int], None] | None = None
               ) -> dict[str, Stats]:
    """Each site's output statistics over the whole calibration set (one batch), the model conditioned on its
    own text encoder. With `correct`, each site's output is replaced by `scale * y + shift` from its statistics
    before the layers after it run. `on_site(done, total)` is called at every site (progress, and where a
    cancelled merge stops: one full-size pass takes minutes)."""
    wanted = set(names)
    stats: dict[str, Stats] = {}

    def observe(name: str, out: torch.Tensor) -> torch.Tensor | None:
        if name not in wanted:
            return None
        if on_site is not None:
            on_site(len(stats), len(wanted))
        flat = channels_last(out)
        st = stats[name] = Stats(flat.shape[1])
        st.update(flat)
        if not (torch.isfinite(st.sum).all() and torch.isfinite(st.sumsq).all()):
            raise RebasinError(f"Activations at {name} became non-finite on the REPAIR inputs; merge these models "
                               "without REPAIR.")
        if correct is None:
            return None
        scale, shift = correct(name, st)
        shape = (1, -1, 1, 1) if out.dim() == 4 else (1,) * (out.dim() - 1) + (-1,)
        return out * scale.to(out).view(shape) + shift.to(out).view(shape)

    fwd = forward_of(c)
    layers = Layers(get, observe, device)
    fwd.unet(c, layers, cal.x, cal.t, fwd.text_encoder(c, layers, cal.ids)[cal.prompt])
    return stats


Progress = Callable[[float, str], None]
# REPAIR's share of its progress per pass: A's trajectory, then the statistics of A, of B and of the corrected merge
# each run the UNet over the same calibration inputs once, so each pass gets a quarter.
_PASS = 0.25


def corrections(spec: ArchSpec[Any], get_a: TensorGetter, get_b_aligned: TensorGetter, get_merge: TensorGetter,
                alpha_of: Callable[[str], float], *, samples: int, seed: int,
                device: torch.device = torch.device("cpu"), progress: Progress | None = None,
                latent_size: int = inputs.LATENT_SIZE) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (scale, shift)} for every site, to fold into the merge's weights (`fold_weight`, `fold_bias`).
    `get_b_aligned` is B with the merge's permutations applied (channel c of a site is A's unit c in both) and
    `alpha_of(key)` the weight of B the merge gave that key (block weights give each block its own)."""
    c = spec.config
    names = sites(spec)

    def step(fraction: float, message: str) -> None:
        if progress is not None:
            progress(fraction, message)

    def sites_of(start: float, message: str) -> Callable[[int, int], None]:
        return lambda done, total: step(start + _PASS * done / total, f"{message} ({done + 1}/{total} layers)")

    step(0.0, "REPAIR: model A's trajectory")
    cal = calibration(c, get_a, samples, seed, device, latent_size,
                      on_step=lambda k, n: step(_PASS * k / n, f"REPAIR: model A's trajectory, step {k + 1}/{n}"))
    step(_PASS, "REPAIR: statistics of model A")
    stats_a = site_stats(c, get_a, cal, names, device, on_site=sites_of(_PASS, "REPAIR: statistics of model A"))
    step(2 * _PASS, "REPAIR: statistics of model B")
    stats_b = site_stats(c, get_b_aligned, cal, names, device,
                         on_site=sites_of(2 * _PASS, "REPAIR: statistics of model B"))
    step(3 * _PASS, "REPAIR: correcting the merge")
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def correct(name: str, merged: Stats) -> tuple[torch.Tensor, torch.Tensor]:
        scale, shift = correction(stats_a[name], stats_b[name], merged, alpha_of(f"{name}.weight"))
        out[name] = (scale.cpu(), shift.cpu())
        return scale, shift

    site_stats(c, get_merge, cal, names, device, correct, on_site=sites_of(3 * _PASS, "REPAIR: correcting the merge"))
    missing = [n for n in names if n not in out]
    if missing:  # every site is on the UNet's path: a miss means the forward pass and the spec disagree
        raise RebasinError(f"REPAIR saw no activations at {missing[0]} ({len(missing)} layers).")
    step(1.0, "REPAIR: done")
    return out
