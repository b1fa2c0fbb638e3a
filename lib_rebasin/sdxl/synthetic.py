"""Synthetic SDXL checkpoints in the single-file (SGM) layout, for tests and benchmarks.

The same scheme as the SD 1.x generator (`sd1/synthetic.py`): every tensor drawn from its own generator seeded by
(seed, key), streamed to disk key by key, and a "fine-tune" is a shared base plus a small per-model perturbation.
The key list and shapes come from the SDXL spec's walk, so the file and the spec cannot disagree.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..arguments import check_arguments
from ..errors import ArgumentError
from ..io.output_file import write_safetensors
from ..io.precisions import PRECISIONS
from ..synthetic_weights import key_seeded_generator, random_tensor
from .config import MINI, SDXL_BASE, SDXLConfig
from .spec import build_spec

SCALES = {"mini": MINI, "full": SDXL_BASE}

# OpenCLIP's LayerNorms (`ln_1`, `ln_2`, `ln_final`) are norms too: gains near 1, as in the HF-layout keys.
_OPEN_CLIP_NORMS = (".ln_1.weight", ".ln_2.weight", "ln_final.weight")


def sdxl_random_tensor(key: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A plausible random fp32 value for one SDXL key (see `synthetic_weights.random_tensor`)."""
    if key.endswith(_OPEN_CLIP_NORMS):
        return 1 + 0.1 * torch.randn(shape, generator=key_seeded_generator(seed, key))
    if key.endswith("logit_scale"):
        return torch.full(shape, math.log(100.0))  # CLIP's trained temperature; unused by SDXL's forward pass
    return random_tensor(key, shape, seed)


def synthetic_tensor(key: str, shape: tuple[int, ...], seed: int, base_seed: int | None = None,
                     delta: float = 0.05) -> torch.Tensor:
    if key.endswith("position_ids"):
        return torch.arange(shape[-1], dtype=torch.int64).reshape(shape)
    if base_seed is None:
        return sdxl_random_tensor(key, shape, seed)
    base = sdxl_random_tensor(key, shape, base_seed)
    noise = torch.randn(shape, generator=key_seeded_generator(seed, key))
    return base + delta * base.std(unbiased=False).clamp_min(1e-3) * noise


def make_checkpoint(path: str | Path, config: SDXLConfig | str = "mini", seed: int = 0, base_seed: int | None = None,
                    delta: float = 0.05, precision: str = "fp16", overwrite: bool = False,
                    extra: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a synthetic SDXL checkpoint ("mini": the reduced test scale, "full": SDXL base size).

    `seed` alone gives an independent model; with `base_seed`, base(base_seed) plus `delta` times per-tensor-std
    noise from `seed` ("fine-tunes of one base"). `extra` adds keys outside the layout (e.g. NoobAI's `v_pred`
    marker) to test copy-through.
    """
    check_arguments("make_sdxl_checkpoint", ("base_seed",), path=path, seed=seed, base_seed=base_seed,
                    delta=delta, precision=precision, overwrite=overwrite, extra=extra)
    given: object = config  # checked as the caller may pass anything
    if not (isinstance(given, SDXLConfig) or (isinstance(given, str) and given in SCALES)):
        raise ArgumentError(f"make_sdxl_checkpoint: config must be an SDXLConfig or one of "
                            f"{', '.join(map(repr, SCALES))}, got {config!r}.")
    cfg = SCALES[config] if isinstance(config, str) else config
    spec = build_spec(cfg)
    dtype = PRECISIONS[precision]
    extra = extra or {}
    entries = [(k, s, torch.int64 if k.endswith("position_ids") else dtype) for k, s in spec.shapes.items()]
    entries += [(k, tuple(v.shape), v.dtype) for k, v in extra.items()]

    def produce(key: str) -> torch.Tensor:
        if key in extra:
            return extra[key]
        t = synthetic_tensor(key, spec.shapes[key], seed, base_seed, delta)
        return t if t.dtype == torch.int64 else t.to(dtype)

    meta = {"lib_rebasin_synthetic": f"seed={seed} base_seed={base_seed} delta={delta} {cfg.describe()}"}
    return write_safetensors(path, entries, produce, meta, overwrite=overwrite)
