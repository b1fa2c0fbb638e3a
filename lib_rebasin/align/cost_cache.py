"""Cost matrices kept between a group's visits and brought up to date by the columns that moved.

A group's cost matrix C = sum over slots of A_s (B_s with its other axes re-indexed)^T depends on the other groups'
permutations only through those re-indexings, not on the group's own. Between two visits most neighbours keep most
of their units (late sweeps of coordinate ascent move few), so with K the columns of a slot whose index changed from
old(c) to new(c),

    C_new - C_old = sum_{c in K} A[:, c] (B[:, new(c)] - B[:, old(c)])^T
                  = sum_{t in S} (A[:, new^-1(t)] - A[:, old^-1(t)]) B[:, t]^T,     S = old(K) = new(K)

(both indices are bijections that agree outside K, so they map K onto the same set): one product over |K| of the
slot's m columns instead of all m. A visit whose update would cost nearly as much as the full matrix, or that
follows `REFRESH` updates of it, computes the full matrix instead (so rounding errors of the updates cannot pile
up). The updated matrix equals the full one up to fp32 rounding (summation order); the search then treats it as
the cost matrix, exactly like the full one.

Kept matrices cost memory (n^2 fp32 each); `budget` bytes bound them. The groups kept are chosen up front by the
multiply-adds a full matrix costs per byte kept (the inner sizes of its slots), so a small budget keeps the matrices
that are expensive to compute and cheap to hold; the others are computed in full on every visit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from ..archspec import ArchSpec, Group, Slot
from .cost import cost_matrix, window
from .permute import Perms, axis_index

TensorGetter = Callable[[str], torch.Tensor]

# Incremental updates of one matrix after which it is computed in full again.
REFRESH = 8
# An update whose products would cost more than this share of the full matrix's computes the full matrix instead
# (the update also reads A's columns twice and subtracts them).
FULL_SHARE = 0.9

Columns = dict[int, torch.Tensor | None]  # axis -> the index that re-indexed it (None: not re-indexed)


@dataclass
class _Entry:
    C: torch.Tensor
    columns: list[Columns]  # per slot of the group
    updates: int = 0


@dataclass
class CacheStats:
    full: int = 0        # matrices computed in full
    updated: int = 0     # matrices brought up to date from the kept one
    unchanged: int = 0   # kept matrices that no column change touched
    work: float = 0.0    # multiply-adds of the products, in units of the groups' full matrices


class CostCache:
    """Each group's cost matrix from its last visit and the column indices it was computed with."""

    def __init__(self, spec: ArchSpec, groups: Iterable[Group], budget: int) -> None:
        self.spec, self.used = spec, 0
        self.entries: dict[str, _Entry] = {}
        self.stats = CacheStats()
        self.kept: set[str] = set()
        room = budget
        for g in sorted(groups, key=lambda g: -self._work(g) / g.size ** 2):
            if 4 * g.size ** 2 <= room:
                self.kept.add(g.name)
                room -= 4 * g.size ** 2

    def cost(self, group: Group, get_a: TensorGetter, get_b: TensorGetter, perms: Perms,
             device: torch.device) -> torch.Tensor:
        """The group's cost matrix (`align/cost.py`'s `cost_matrix`) with every other group at `perms`."""
        columns = [self._columns(slot, perms) for slot in group.slots]
        entry = self.entries.get(group.name)
        if entry is not None and entry.updates < REFRESH:
            moves = self._moves(group, entry, columns)
            if moves is not None:
                self._update(group, entry, moves, get_a, get_b, perms)
                entry.columns = columns
                return entry.C
        C = cost_matrix(self.spec, group, get_a, get_b, perms, device)
        self.stats.full += 1
        self.stats.work += 1.0
        if entry is not None:
            entry.C, entry.columns, entry.updates = C, columns, 0
        elif group.name in self.kept:
            self.entries[group.name] = _Entry(C, columns)
            self.used += C.numel() * C.element_size()
        return C

    def _columns(self, slot: Slot, perms: Perms) -> Columns:
        return {axis: axis_index(self.spec, slot.key, axis, perms)
                for axis in self.spec.axes[slot.key] if axis != slot.axis}

    def _moves(self, group: Group, entry: _Entry, columns: list[Columns]
               ) -> list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] | None:
        """Per slot with moved columns: (slot index, axis, S, new^-1(S), old^-1(S)), or None when the full
        matrix is cheaper (or a slot moved on two axes at once)."""
        moves = []
        work = 0.0
        for k, (slot, old, new) in enumerate(zip(group.slots, entry.columns, columns, strict=True)):
            changed = [ax for ax in new if not _same(old[ax], new[ax])]
            if not changed:
                continue
            if len(changed) > 1:
                return None
            ax = changed[0]
            d = self.spec.shapes[slot.key][ax]
            o, n = _full(old[ax], d), _full(new[ax], d)
            S = o[o != n]
            work += len(S) / d * self._share(group, slot)
            moves.append((k, ax, S, _inverse(n)[S], _inverse(o)[S]))
        if work > FULL_SHARE:
            return None
        return moves  # type: ignore[return-value]

    def _slot_work(self, slot: Slot) -> int:
        """Multiply-adds of the slot's product: length^2 times the inner size."""
        return slot.length * math.prod(self.spec.shapes[slot.key])

    def _work(self, group: Group) -> int:
        return sum(self._slot_work(s) for s in group.slots)

    def _share(self, group: Group, slot: Slot) -> float:
        """The slot's share of the multiply-adds of the group's full matrix."""
        return self._slot_work(slot) / self._work(group)

    def _update(self, group: Group, entry: _Entry, moves: list, get_a: TensorGetter, get_b: TensorGetter,
                perms: Perms) -> None:
        if not moves:
            self.stats.unchanged += 1
            return
        work = 0.0
        for k, ax, S, src_new, src_old in moves:
            slot = group.slots[k]
            ta, tb = get_a(slot.key), get_b(slot.key)
            dev = entry.C.device
            a = ta.narrow(slot.axis, slot.offset, slot.length)
            a = (a.index_select(ax, src_new.to(dev)).float() - a.index_select(ax, src_old.to(dev)).float())
            b = tb.narrow(slot.axis, slot.offset, slot.length)
            for axis, idx in entry.columns[k].items():
                # The other re-indexed axes (unchanged since the last visit) read B as before.
                if axis != ax and idx is not None:
                    b = b.index_select(axis, idx.to(dev))
            b = b.index_select(ax, S.to(dev)).float()
            n = slot.length
            a, b = a.movedim(slot.axis, 0).reshape(n, -1), b.movedim(slot.axis, 0).reshape(n, -1)
            window(entry.C, slot).addmm_(a, b.T)
            work += len(S) / self.spec.shapes[slot.key][ax] * self._share(group, slot)
        entry.updates += 1
        self.stats.updated += 1
        self.stats.work += work


def _same(x: torch.Tensor | None, y: torch.Tensor | None) -> bool:
    if x is None or y is None:
        return x is y
    return bool(torch.equal(x, y))


def _full(idx: torch.Tensor | None, d: int) -> torch.Tensor:
    return torch.arange(d) if idx is None else idx.cpu()


def _inverse(idx: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(idx)
    inv[idx] = torch.arange(len(idx))
    return inv
