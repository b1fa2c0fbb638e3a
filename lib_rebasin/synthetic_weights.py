"""Random but plausible weights for synthetic checkpoints of any architecture (`sd1/synthetic.py`,
`sdxl/synthetic.py`).

Each tensor is drawn from its own generator seeded by (seed, key), so a file is streamed to disk key by key and
the same seed always gives the same bytes.
"""

from __future__ import annotations

import math
import zlib

import torch


def key_seeded_generator(seed: int, key: str) -> torch.Generator:
    """The generator of one key's tensor under `seed`."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63))


def random_tensor(key: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A plausible random fp32 value for one key: norm gains near 1, small biases, 1/sqrt(fan_in) weights."""
    g = key_seeded_generator(seed, key)
    name = key.rsplit(".", 1)[-1]
    is_norm = any(s in key for s in ("norm", "layer_norm", "in_layers.0.", "out_layers.0.", ".out.0."))
    if is_norm and name == "weight":
        return 1 + 0.1 * torch.randn(shape, generator=g)
    if name == "bias" or len(shape) == 1:
        return 0.05 * torch.randn(shape, generator=g)
    if "embedding" in key:
        return 0.1 * torch.randn(shape, generator=g)
    fan_in = math.prod(shape[1:])
    return torch.randn(shape, generator=g) / math.sqrt(fan_in)
