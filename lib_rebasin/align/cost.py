"""Cost matrices of weight matching: C[i, j] = similarity of A's unit i and B's unit j over a group's slots, with
every other group at its current permutation (see `align/weight_matching.py`)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..archspec import ArchSpec, Group, Slot
from .permute import Perms, axis_index

TensorGetter = Callable[[str], torch.Tensor]


def unit_rows(t: torch.Tensor, axis: int, offset: int, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The window [offset, offset+n) of `axis`, as an (n, rest) matrix of `dtype`."""
    return t.narrow(axis, offset, n).to(dtype).movedim(axis, 0).reshape(n, -1)


def other_axes_permuted(spec: ArchSpec, slot: Slot, t: torch.Tensor, perms: Perms,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    n = slot.length
    w = t.narrow(slot.axis, slot.offset, n).to(dtype)
    for axis in spec.axes[slot.key]:
        if axis == slot.axis:
            continue
        idx = axis_index(spec, slot.key, axis, perms)
        if idx is not None:
            w = w.index_select(axis, idx.to(w.device))
    return w.movedim(slot.axis, 0).reshape(n, -1)


def empty_cost(group: Group, device: torch.device, out: torch.Tensor | None = None,
               zeroed: bool = True) -> torch.Tensor:
    """A zero cost matrix, except -inf where no legal permutation can go: between the two halves (q/k, v/o) of an
    attention group, so that row-argmax and the certificates stay inside each half. `out`: fp32 storage to reuse
    (its first n^2 elements); `zeroed=False` leaves the windows the slots fill (`window`) as the storage holds
    them, for a caller that writes each one before reading it."""
    n = group.size
    if out is None:
        C = torch.zeros(n, n, dtype=torch.float32, device=device)
    else:
        C = out[:n * n].view(n, n)
        if zeroed:
            C.zero_()
    if group.structure.shared_blocks:
        C[:n // 2, n // 2:] = float("-inf")
        C[n // 2:, :n // 2] = float("-inf")
    return C


def window(M: torch.Tensor, slot: Slot) -> torch.Tensor:
    """The block of a group's matrix that one slot's units fill (the whole matrix but for attention halves)."""
    return M[slot.start:slot.start + slot.length, slot.start:slot.start + slot.length]


def cost_matrix(spec: ArchSpec, group: Group, get_a: TensorGetter, get_b: TensorGetter, perms: Perms,
                device: torch.device) -> torch.Tensor:
    """C[i, j] = similarity of A's unit i and B's unit j, with every other group at its current permutation.

    `perms` only needs the groups that are not the identity (an absent group is not re-indexed)."""
    C = empty_cost(group, device)
    for slot in group.slots:
        a = unit_rows(get_a(slot.key), slot.axis, slot.offset, slot.length)
        b = other_axes_permuted(spec, slot, get_b(slot.key), perms)
        window(C, slot).addmm_(a, b.T)
    return C
