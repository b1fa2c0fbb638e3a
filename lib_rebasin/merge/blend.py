"""Blends: lazily evaluated linear combinations of (possibly permuted) source models, key by key."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..align.permute import Perms, permute_tensor
from ..align.weight_matching import TensorGetter
from ..archspec import ArchSpec
from ..arguments import check_arguments
from ..io.model_input import ModelInput


@dataclass
class Term:
    weight: float
    get: TensorGetter
    perms: Perms


class Blend:
    """A lazily evaluated linear combination sum_i w_i * perm_i(model_i), in fp32, key by key."""

    def __init__(self, spec: ArchSpec[Any], terms: list[Term], device: torch.device) -> None:
        self.spec, self.terms, self.device = spec, terms, device

    def __call__(self, key: str, observe: Callable[[list[tuple[float, torch.Tensor]]], None] | None = None,
                 device: torch.device | None = None) -> torch.Tensor:
        """The blended fp32 value of `key`; `observe` sees the (weight, permuted fp32 source) terms first.
        `device` overrides the blend's own for this key (device_budget.py's fallback)."""
        device = device or self.device
        values = [(t.weight, permute_tensor(self.spec, key, t.get(key).to(device, torch.float32), t.perms))
                  for t in self.terms]
        if observe is not None:
            observe(values)
        shape = values[0][1].shape
        if all(v.shape == shape for _, v in values):
            out = torch.zeros(shape, dtype=torch.float32, device=device)
            for w, v in values:
                out.add_(v, alpha=w)
            return out
        # A wider first model (inpainting A, plain B): blend the shared window, keep A's extra channels.
        common = tuple(slice(0, min(v.shape[d] for _, v in values)) for d in range(len(shape)))
        out = values[0][1].clone()
        out[common] = 0
        for w, v in values:
            out[common] += w * v[common]
        return out


def telescoping_schedule(alpha: float, steps: int) -> list[float]:
    """Per-step weights a_x with prod(1 - a_x) = 1 - alpha: after step x, B's total weight is alpha*x/steps."""
    check_arguments("telescoping_schedule", alpha=alpha, steps=steps)
    out = []
    for x in range(1, steps + 1):
        before = 1 - alpha * (x - 1) / steps
        after = 1 - alpha * x / steps
        out.append(1 - after / before if before > 0 else 1.0)
    return out



def merge_equal_terms(terms: list[Term]) -> list[Term]:
    """Fold terms that read the same source with the same permutation (fewer passes when writing)."""
    out: list[Term] = []
    for t in terms:
        for o in out:
            if o.get == t.get and o.perms.keys() == t.perms.keys() and all(
                    torch.equal(o.perms[k], t.perms[k]) for k in o.perms):
                o.weight += t.weight
                break
        else:
            out.append(Term(t.weight, t.get, dict(t.perms)))
    return out



def shared_window(get: TensorGetter, like: ModelInput) -> TensorGetter:
    """`get`, narrowed to `like`'s shapes where they differ (A's wider inpainting conv_in vs a plain B)."""
    infos = like.ckpt.infos

    def narrowed(key: str) -> torch.Tensor:
        t = get(key)
        shape = infos[key].shape if key in infos else t.shape
        if tuple(t.shape) != tuple(shape):
            t = t[tuple(slice(0, n) for n in shape)]
        return t

    return narrowed



class BlockBlend:
    """Block weights over a linear method: each key is produced by the blend built for its own alpha.

    `blend_for(alpha)` builds the linear combination for one weight of B; keys of blocks that share a weight share
    one blend (at most 26)."""

    def __init__(self, blend_for: Callable[[float], Blend], alpha_of: Callable[[str], float]) -> None:
        self.blend_for, self.alpha_of = blend_for, alpha_of
        self.blends: dict[float, Blend] = {}

    def for_key(self, key: str) -> Blend:
        alpha = self.alpha_of(key)
        if alpha not in self.blends:
            self.blends[alpha] = self.blend_for(alpha)
        return self.blends[alpha]

    def __call__(self, key: str, observe: Callable[[list[tuple[float, torch.Tensor]]], None] | None = None,
                 device: torch.device | None = None) -> torch.Tensor:
        return self.for_key(key)(key, observe, device)


class KeyFunctionBlend:
    """A non-linear method: its per-key function (methods.py) over the fp32 A, B, C of each key, B and C permuted
    by `perms` (re-basin alignment), with the key's alpha and its own seeded generator."""

    def __init__(self, spec: ArchSpec[Any], fn: Callable[..., torch.Tensor], get_a: TensorGetter, get_b: TensorGetter,
                 get_c: TensorGetter | None, perms: Perms, alpha_of: Callable[[str], float],
                 params: dict[str, object], seed: int, device: torch.device) -> None:
        self.spec, self.fn, self.perms, self.device = spec, fn, perms, device
        self.gets = (get_a, get_b, get_c)
        self.alpha_of, self.params, self.seed = alpha_of, params, seed

    def __call__(self, key: str, observe: object = None, device: torch.device | None = None) -> torch.Tensor:
        from ..methods import key_generator

        device = device or self.device
        vals = [None if g is None else permute_tensor(self.spec, key, g(key).to(device, torch.float32),
                                                      {} if i == 0 else self.perms)
                for i, g in enumerate(self.gets)]
        a, b, c = vals
        assert a is not None and b is not None
        rng = key_generator(self.seed, key)
        alpha = self.alpha_of(key)
        present = [v for v in vals if v is not None]
        if all(v.shape == a.shape for v in present):
            return self.fn(a, b, c, alpha, self.params, rng)
        # A wider first model (inpainting A, plain B/C): merge the shared window, keep A's extra channels.
        common = tuple(slice(0, min(v.shape[d] for v in present)) for d in range(a.dim()))
        out = a.clone()
        out[common] = self.fn(a[common], b[common], None if c is None else c[common], alpha, self.params, rng)
        return out
