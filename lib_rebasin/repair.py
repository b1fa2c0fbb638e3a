"""REPAIR: a statistics correction after merging (Jordan, Sedghi, Saukh, Entezari, Neyshabur, "REPAIR:
REnormalizing Permuted Activations for Interpolation Repair", ICLR 2023).

Interpolating two aligned networks shrinks the spread of their units' activations ("variance collapse"). REPAIR
maps each channel c of a chosen layer's output in the merge M back to the interpolation of the parents':

    mu_T = (1 - alpha) mu_A + alpha mu_B        sd_T = (1 - alpha) sd_A + alpha sd_B
    y'   = (y - mu_M) * s + mu_T,  s = sd_T / sd_M
    W'[c] = s[c] W[c],   b'[c] = s[c] b[c] + (mu_T[c] - s[c] mu_M[c])

(B already aligned to A, so channel c is the same unit in both). The correction is folded into the layer's weight
and bias, so the result is an ordinary checkpoint. Host-free and independent of how activations are collected:
the caller runs the models (A, aligned B, and the merge with every upstream correction already applied, as the
paper's reset layers do), feeds each layer's outputs to `Stats`, and folds `correction` with `fold`.
Measured on the quality benchmark (benchmarks/quality/LEVERS.md): it depends on width and alignment.
"""

from __future__ import annotations

import torch

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
    scale = sd_t / (merged.std + EPS)
    return scale, mu_t - scale * merged.mean


def fold(weight: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor,
         shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A conv/linear layer's (weight, bias) with y' = scale * y + shift applied to its outputs (axis 0)."""
    if weight.shape[0] != scale.shape[0] or bias.shape != (weight.shape[0],):
        raise ValueError(f"cannot fold a {scale.shape[0]}-channel correction into weight {tuple(weight.shape)} "
                         f"and bias {tuple(bias.shape)}")
    s = scale.double()
    w = weight.double() * s.view(-1, *([1] * (weight.dim() - 1)))
    return w.to(weight.dtype), (bias.double() * s + shift.double()).to(bias.dtype)
