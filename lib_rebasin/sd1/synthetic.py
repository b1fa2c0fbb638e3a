"""Synthetic SD 1.x checkpoints with the exact key layout, for tests, benchmarks and the README demo.

Nothing can be downloaded here, and function preservation only needs random weights. Each tensor is drawn from
its own generator seeded by (seed, key), so a file is streamed to disk key by key (no full model in memory) and
the same seed always gives the same bytes. A "fine-tune" is a shared base plus a small per-model perturbation,
which is what same-base community models look like to weight matching.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..arguments import check_arguments
from ..errors import ArgumentError
from ..io.output_file import write_safetensors
from ..io.precisions import PRECISIONS
from ..synthetic_weights import key_seeded_generator, random_tensor
from .config import MINI, SD15, TINY, SD1Config
from .spec import SCHEDULE_BUFFERS, build_spec

SCALES = {"tiny": TINY, "mini": MINI, "full": SD15}


def _schedule(name: str, timesteps: int) -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, timesteps, dtype=torch.float64) ** 2
    ac = torch.cumprod(1 - betas, 0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    post_var = betas * (1 - prev) / (1 - ac)
    values = {
        "betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": prev,
        "sqrt_alphas_cumprod": ac.sqrt(), "sqrt_one_minus_alphas_cumprod": (1 - ac).sqrt(),
        "log_one_minus_alphas_cumprod": (1 - ac).log(), "sqrt_recip_alphas_cumprod": (1 / ac).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1 / ac - 1).sqrt(), "posterior_variance": post_var,
        "posterior_log_variance_clipped": torch.log(torch.clamp(post_var, min=1e-20)),
        "posterior_mean_coef1": betas * prev.sqrt() / (1 - ac),
        "posterior_mean_coef2": (1 - prev) * (1 - betas).sqrt() / (1 - ac),
    }
    return values[name].float()


def synthetic_tensor(key: str, shape: tuple[int, ...], seed: int, base_seed: int | None, delta: float,
                     timesteps: int) -> torch.Tensor:
    if key in SCHEDULE_BUFFERS:
        return _schedule(key, timesteps)
    if key.endswith("position_ids"):
        return torch.arange(shape[-1], dtype=torch.int64).reshape(shape)
    if base_seed is None:
        return random_tensor(key, shape, seed)
    base = random_tensor(key, shape, base_seed)
    noise = torch.randn(shape, generator=key_seeded_generator(seed, key))
    return base + delta * base.std(unbiased=False).clamp_min(1e-3) * noise


def make_checkpoint(path: str | Path, config: SD1Config | str = "mini", seed: int = 0, base_seed: int | None = None,
                    delta: float = 0.05, precision: str = "fp16", overwrite: bool = False,
                    extra: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a synthetic SD 1.x checkpoint.

    `seed` alone gives an independent model. With `base_seed`, the model is base(base_seed) plus `delta` times
    per-tensor-std noise drawn from `seed`: two such models are "fine-tunes of one base".
    `extra` adds keys outside the SD layout (e.g. EMA or embedding_manager keys) to test copy-through.
    """
    check_arguments("make_checkpoint", ("base_seed",), path=path, config=config, seed=seed, base_seed=base_seed,
                    delta=delta, precision=precision, overwrite=overwrite, extra=extra)
    given: object = config  # `check_arguments` accepts any architecture's config
    if not (isinstance(given, SD1Config) or (isinstance(given, str) and given in SCALES)):
        raise ArgumentError(f"make_checkpoint: config must be an SD1Config or one of "
                            f"{', '.join(map(repr, SCALES))}, got {config!r}.")
    cfg = SCALES[config] if isinstance(config, str) else config
    spec = build_spec(cfg)
    dtype = PRECISIONS[precision]
    extra = extra or {}
    entries = []
    for key, shape in spec.shapes.items():
        is_int = key.endswith("position_ids")
        entries.append((key, shape, torch.int64 if is_int else dtype))
    entries += [(k, tuple(v.shape), v.dtype) for k, v in extra.items()]

    def produce(key: str) -> torch.Tensor:
        if key in extra:
            return extra[key]
        t = synthetic_tensor(key, spec.shapes[key], seed, base_seed, delta, cfg.timesteps)
        return t if t.dtype == torch.int64 else t.to(dtype)

    meta = {"lib_rebasin_synthetic": f"seed={seed} base_seed={base_seed} delta={delta} {cfg.describe()}"}
    return write_safetensors(path, entries, produce, meta, overwrite=overwrite)
