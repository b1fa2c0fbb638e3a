"""What both models see during activation matching, made without data: seeded prompts and model A's own DDIM
trajectory.

The core has no images, no VAE encoder input and no tokenizer, so the inputs are the ones a model really sees when
it generates:
- prompts: seeded token ids in CLIP's id range, laid out as the WebUI's tokenizer lays out a prompt (BOS, 5-20
  tokens, then EOS repeated to the 77 positions), plus the empty prompt (BOS, EOS...) that classifier-free guidance
  runs; random ids are not sentences, but they drive every token embedding, position and attention path the
  text encoder has, and the UNet's cross-attention sees the contexts they give;
- latents: seeded Gaussian noise, denoised by model A with DDIM (eta 0, classifier-free guidance 7.5, SD 1.x's
  scaled-linear schedule) at trailing timesteps 999, 799, 599, 399, 199; both models are run on the x_t of each
  step, with the prompt's context and with the empty one, as a sampler runs them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from .config import SD1Config

TIMESTEPS = (999, 799, 599, 399, 199)
GUIDANCE = 7.5
# Latent side used for statistics (16 = 128 px images). Units are matched per channel, pooled over positions;
# 16x16 gives 256 positions per image at the UNet's top level and 16 at its bottom; fewer positions per channel
# made the statistics worse (8x8 against 16x16: benchmarks/quality/RESULTS.md, "latent side").
LATENT_SIZE = 16
PROMPT_TOKENS = (5, 20)


class Latents(Protocol):
    """What the latents and the schedule depend on (SD 1.x and SDXL share this schedule and these latents)."""

    @property
    def unet_out_channels(self) -> int: ...

    @property
    def timesteps(self) -> int: ...


def special_tokens(c: SD1Config) -> tuple[int, int]:
    """(BOS, EOS): CLIP-L's 49406/49407, the last two ids of a reduced vocabulary (the test models' rule)."""
    return (49406, 49407) if c.te_vocab > 49407 else (c.te_vocab - 2, c.te_vocab - 1)


def prompts(c: SD1Config, n: int, generator: torch.Generator) -> torch.Tensor:
    """(n + 1, positions) token ids: n seeded prompts, then the empty prompt."""
    bos, eos = special_tokens(c)
    ids = torch.full((n + 1, c.te_positions), eos, dtype=torch.long)
    ids[:, 0] = bos
    lo, hi = PROMPT_TOKENS
    for i in range(n):
        length = int(torch.randint(lo, min(hi, c.te_positions - 2) + 1, (1,), generator=generator))
        ids[i, 1:1 + length] = torch.randint(0, min(bos, eos), (length,), generator=generator)
    return ids


def alphas_cumprod(c: Latents) -> torch.Tensor:
    """SD 1.x's training schedule (scaled linear betas 0.00085..0.012), which every SD 1.x and SDXL model
    shares."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, c.timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def noise(c: Latents, n: int, generator: torch.Generator, size: int = LATENT_SIZE) -> torch.Tensor:
    return torch.randn(n, c.unet_out_channels, size, size, generator=generator)


def ddim_step(x: torch.Tensor, eps: torch.Tensor, t: int, t_next: int | None, ac: torch.Tensor) -> torch.Tensor:
    """x_t -> x_{t_next} (eta 0); the last step returns the predicted x_0."""
    a = float(ac[t])
    a_next = float(ac[t_next]) if t_next is not None else 1.0
    x0 = (x - (1 - a) ** 0.5 * eps) / a ** 0.5
    return a_next ** 0.5 * x0 + (1 - a_next) ** 0.5 * eps


def guided(eps: torch.Tensor, n: int) -> torch.Tensor:
    """Classifier-free guidance over a batch laid out as [n conditional, n unconditional]."""
    cond, uncond = eps[:n], eps[n:]
    return uncond + GUIDANCE * (cond - uncond)


# (step index, timestep, x_t) -> the guided noise prediction at x_t.
GuidedEps = Callable[[int, int, torch.Tensor], torch.Tensor]


def ddim_trajectory(c: Latents, x: torch.Tensor, guided_eps: GuidedEps) -> torch.Tensor:
    """Model A's DDIM trajectory from the noise `x` over TIMESTEPS, as a sampler runs it: at each step,
    `guided_eps(k, t, x_t)` runs the models on x_t (with the prompt and the empty one) and returns A's guided
    prediction; returns the last step's predicted x_0."""
    ac = alphas_cumprod(c)
    for k, t in enumerate(TIMESTEPS):
        eps = guided_eps(k, t, x)
        x = ddim_step(x, eps, t, TIMESTEPS[k + 1] if k + 1 < len(TIMESTEPS) else None, ac)
    return x
