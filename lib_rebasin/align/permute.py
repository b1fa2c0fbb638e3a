"""Applying permutations to tensors, and drawing random legal ones.

A permutation of a group is a 1-D LongTensor `perm` with `new[i] = old[perm[i]]` along every slot of the group
(`index_select(axis, perm)`). Groups absent from a `Perms` dict are the identity.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ..archspec import ArchSpec, Group, Structure

Perms = dict[str, torch.Tensor]


def axis_index(spec: ArchSpec[Any], key: str, axis: int, perms: Perms) -> torch.Tensor | None:
    """The full index vector for one axis of `key`, or None when that axis is not permuted."""
    layout = spec.axes.get(key, {}).get(axis)
    if not layout or not any(name in perms for name, *_ in layout):
        return None
    pieces = []
    offset = 0
    for name, n, start in layout:
        p = perms.get(name) if name is not None else None
        # A legal permutation maps the window [start, start + n) onto itself (attention halves), so shifting
        # it by (offset - start) gives this axis's indices.
        pieces.append(p[start:start + n] + (offset - start) if p is not None else torch.arange(offset, offset + n))
        offset += n
    return torch.cat(pieces)


def permute_tensor(spec: ArchSpec[Any], key: str, tensor: torch.Tensor, perms: Perms) -> torch.Tensor:
    """Return `tensor` (the value of `key`) with every permuted axis re-indexed; unchanged if none is."""
    for axis in spec.axes.get(key, {}):
        idx = axis_index(spec, key, axis, perms)
        if idx is not None:
            tensor = tensor.index_select(axis, idx.to(tensor.device))
    return tensor


def is_identity(perm: torch.Tensor) -> bool:
    return bool(torch.equal(perm, torch.arange(len(perm), device=perm.device)))


def inverse(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(len(perm), device=perm.device)
    return inv


def random_legal_perm(structure: Structure, generator: torch.Generator) -> torch.Tensor:
    """A uniformly drawn permutation among those `structure` allows."""
    n = structure.size
    if structure.shared_blocks:
        b, half = structure.shared_blocks, n // 2
        order = torch.randperm(half // b, generator=generator)
        return torch.cat([lo + int(h) * b + torch.randperm(b, generator=generator)
                          for lo in (0, half) for h in order])
    if structure.intervals:
        out = torch.empty(n, dtype=torch.long)
        for lo, hi in structure.intervals:
            out[lo:hi] = lo + _hierarchical(hi - lo, structure.levels, generator)
        return out
    return _hierarchical(n, structure.levels, generator)


def _hierarchical(n: int, levels: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    if not levels:
        return torch.randperm(n, generator=generator)
    block = levels[-1]
    order = torch.randperm(n // block, generator=generator)
    pieces = [int(b) * block + _hierarchical(block, levels[:-1], generator) for b in order]
    return torch.cat(pieces)


def random_perms(groups: Iterable[Group], seed: int) -> Perms:
    g = torch.Generator().manual_seed(seed)
    return {grp.name: random_legal_perm(grp.structure, g) for grp in groups}


def is_legal(structure: Structure, perm: torch.Tensor) -> bool:
    """Vectorised: is `perm` a permutation allowed by `structure`?"""
    n = structure.size
    if len(perm) != n or len(torch.unique(perm)) != n:
        return False
    if structure.shared_blocks:
        b, half = structure.shared_blocks, n // 2
        src = (perm // b).view(2, -1, b)  # block of each unit, per half
        # Each block comes whole from one block of its own half, and both halves take the same block order.
        return bool((src == src[:, :, :1]).all() and torch.equal(src[1, :, 0] - half // b, src[0, :, 0]))
    if structure.intervals:
        starts = torch.tensor([lo for lo, _ in structure.intervals], device=perm.device)
        interval_of = torch.bucketize(torch.arange(n, device=perm.device), starts, right=True)
        if not torch.equal(interval_of[perm], interval_of):
            return False
    for b in structure.levels:
        src = (perm // b).view(-1, b)
        if not bool((src == src[:, :1]).all()):
            return False
    return True
