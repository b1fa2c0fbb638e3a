"""The data: scikit-learn's bundled digits (1,797 8x8 images, no download) as 4x8x8 "latents".

A digit x in [-1, 1] becomes the latent 2 v x, with v one fixed unit vector in R^4 (seed 0): four correlated
channels, per-channel scale about 1 like SD's scaled latents. Decoding projects back onto v. The split is fixed.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

TEST_FRACTION = 0.2


@dataclass(frozen=True)
class Digits:
    train_x: torch.Tensor   # (N, 1, 8, 8) in [-1, 1]
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


@lru_cache(maxsize=1)
def digits() -> Digits:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    y = torch.tensor(d.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_test = int(len(y) * TEST_FRACTION)
    test, train = order[:n_test], order[n_test:]
    return Digits(x[train], y[train], x[test], y[test])


def latent_direction() -> torch.Tensor:
    v = torch.randn(4, generator=torch.Generator().manual_seed(0))
    return v / v.norm()


def encode(x: torch.Tensor) -> torch.Tensor:
    """(N, 1, 8, 8) -> (N, 4, 8, 8)."""
    return 2.0 * latent_direction().view(1, 4, 1, 1) * x


def decode(latent: torch.Tensor) -> torch.Tensor:
    """(N, 4, 8, 8) -> (N, 1, 8, 8) in [-1, 1]."""
    return ((latent * latent_direction().view(1, 4, 1, 1)).sum(1, keepdim=True) / 2.0).clamp(-1, 1)


def to_sklearn(x: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1] -> rows of 64 pixels in digits' 0..16 scale."""
    return ((x.reshape(len(x), 64) + 1.0) * 8.0).numpy()
