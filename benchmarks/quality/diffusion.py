"""DDPM training targets and a DDIM sampler, on SD 1.x's noise schedule (scaled linear, 1,000 steps)."""

from __future__ import annotations

from typing import Callable

import torch

TIMESTEPS = 1000


def alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, TIMESTEPS, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def noisy(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    ac = alphas_cumprod()[t].view(-1, 1, 1, 1)
    return ac.sqrt() * x0 + (1 - ac).sqrt() * noise


EpsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t, labels) -> eps


@torch.no_grad()
def ddim_sample(eps: EpsFn, labels: torch.Tensor, null_label: int, seed: int, steps: int = 25,
                guidance: float = 2.0) -> torch.Tensor:
    """Deterministic DDIM (eta 0) with classifier-free guidance; the start noise is drawn from `seed`."""
    ac = alphas_cumprod()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(labels), 4, 8, 8, generator=g)
    ts = torch.linspace(TIMESTEPS - 1, 0, steps).round().long()
    null = torch.full_like(labels, null_label)
    for i, t in enumerate(ts):
        tt = t.repeat(len(labels))
        both = eps(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([labels, null]))
        e_c, e_u = both.chunk(2)
        e = e_u + guidance * (e_c - e_u)
        a_t = ac[t]
        a_prev = ac[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
        x0 = (x - (1 - a_t).sqrt() * e) / a_t.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * e
    return x
