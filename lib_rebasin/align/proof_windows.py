"""The partial certificate's window products (`align.partial_certificate`): each slot of a group read for a proof
(its rows, its share of inner columns by stage, its statistics), the windows of slots that fill the same units, and
the products that fill the proof's matrix a stage at a time, side by side or one slot at a time, whichever has the
smaller rounding bound (the bounds are derived in that module's docstring)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..archspec import Group, Slot
from .cost import window

U_FP32 = 2.0 ** -24  # unit roundoff of fp32


def gamma(n: int) -> float:
    return n * U_FP32 / (1 - n * U_FP32)


class ProofSlot:
    """One slot of a visit: its rows of A and B as (units, d1, rest...) (stored dtype), where the current partner
    of each row lies in the window, the column cuts of the shares, and its statistics over all columns.

    `a` and `b` may hold only the first slices of d1 (`cols` is the whole count): `more()` then reads the whole
    rows when a share needs columns beyond them."""

    def __init__(self, slot: Slot, a: torch.Tensor, b: torch.Tensor, local: torch.Tensor | None,
                 stats: tuple[torch.Tensor, float], cols: int | None = None,
                 more: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        self.slot, self.a, self.b, self.local, self.more = slot, a, b, local, more
        self.lo, self.hi = slot.start, slot.start + slot.length
        self.inner = a[0, 0].numel() if a.dim() > 1 else 1
        cols = cols if cols is not None else a.shape[1] if a.dim() > 1 else 1
        self.m = cols * self.inner
        self.cols = cols
        self.cuts = [0]
        self.sq_a, self.diff = stats[0]
        self.e = stats[1]
        self.d_s = torch.zeros(slot.length, dtype=torch.float64, device=a.device)
        self.e_s = 0.0

    def take(self, stage: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The columns that `stage` adds, of A's and B's rows (stored dtype, (units, columns, rest...)); None when it
        adds none. Records their rounding bound for the partner distances over them."""
        c0, c1 = self.cuts[stage], self.cuts[stage + 1]
        if c1 <= c0:
            return None
        if self.more is not None and c1 > self.a.shape[1]:
            self.a, self.b = self.more()  # beyond the columns kept: the whole rows
            self.more = None
        a, b = (t[:, c0:c1] if t.dim() > 1 else t[:, None] for t in (self.a, self.b))
        self.e_s = max(self.e_s, gamma(b[0].numel()) + 6 * U_FP32)
        return a, b

    def cut(self, fractions: list[float]) -> None:
        """The columns each stage multiplies out: `fractions` of them (at least one), whole slices of the first
        dim after the units' so that a chunk is one slice of the view."""
        self.cuts = [0] + [min(self.cols, math.ceil(math.ceil(f * self.m) / self.inner)) for f in fractions]

    def columns(self, stage: int) -> int:
        """Columns multiplied out once `stage` is done."""
        return min(self.m, self.cuts[stage + 1] * self.inner)

    def rest_difference(self, stage: int) -> torch.Tensor:
        """Upper bound of each row's D over the columns not yet multiplied out."""
        if self.cuts[stage + 1] * self.inner >= self.m:
            return torch.zeros_like(self.d_s)
        return (self.diff * (1 + 2 * self.e) - self.d_s * (1 - self.e_s)).clamp_(min=0)


def local_rows(rows: torch.Tensor, sl: ProofSlot) -> torch.Tensor:
    """The rows of `rows` inside the slot's window, as indices into it."""
    return rows[(rows >= sl.lo) & (rows < sl.hi)] - sl.lo


def windows_of(slots: list[ProofSlot]) -> list[list[ProofSlot]]:
    """The slots by the units they fill: the whole group, or one attention half (disjoint windows)."""
    out: dict[tuple[int, int], list[ProofSlot]] = {}
    for sl in slots:
        out.setdefault((sl.lo, sl.hi), []).append(sl)
    return list(out.values())


def fills(windows: list[list[ProofSlot]], group: Group) -> bool:
    """Whether the windows cover every entry of the group's matrix that is not -inf (`cost.empty_cost`): the whole
    matrix, or each attention half (every spec's groups; a matrix they did not cover would have to be zeroed)."""
    n = group.size
    spans = {(w[0].lo, w[0].hi) for w in windows}
    return spans == ({(0, n // 2), (n // 2, n)} if group.structure.shared_blocks else {(0, n)})


def joined_stages(members: list[ProofSlot], stages: int) -> int:
    """How many leading stages multiply a window's slots out side by side (one product per stage), the later ones
    one product per slot: all of them, the first only, or none, whichever gives the smallest rounding bound at the
    last stage (`rounding_depth`; a tie goes to fewer products). Side by side the bound grows with all the window's
    columns, one product per slot with its longest slot's plus an accumulation per slot and stage. The first stage
    side by side is one pass over the window instead of one per slot (a bias alone is a pass over it for one
    column), and its columns are few, so it seldom raises the bound; a window of many wide slots (the text
    encoder's residual) still goes slot by slot throughout, and side by side would read all its slots' whole rows
    at a later share."""
    return min((stages, 1, 0), key=lambda joined: rounding_depth(members, stages - 1, joined))


def rounding_depth(members: list[ProofSlot], stage: int, joined: int) -> int:
    """The N of the rounding bound gamma_(N + 1) (see `align.partial_certificate`) of a window's entries once
    `stage` is done, its first `joined` stages multiplied out side by side: the columns of its longest product
    (each counted with the columns of the earlier stages) plus the products added into an entry. A product's term
    is rounded at most once per other term of its product and once per product added into the entry."""
    longest = sum(sl.columns(min(stage, joined - 1)) for sl in members) if joined else 0
    if stage >= joined:
        longest = max(longest, max(sl.columns(stage) for sl in members))
    products = min(stage + 1, joined) + len(members) * max(0, stage + 1 - joined)
    return longest + products


def add_window(members: list[ProofSlot], stage: int, P: torch.Tensor, pending: torch.Tensor | None,
               col_sq: torch.Tensor, together: bool = True, fresh: bool = False) -> None:
    """`_add_window_of` for the window's slots side by side (`together`), or for each slot in turn. `fresh`: P's
    window holds nothing yet (not even zeros) and is written over by the first product."""
    if together:
        _add_window_of(members, stage, P, pending, col_sq, fresh)
    else:
        for i, sl in enumerate(members):
            _add_window_of([sl], stage, P, pending, col_sq, fresh and i == 0)


def _add_window_of(members: list[ProofSlot], stage: int, P: torch.Tensor, pending: torch.Tensor | None,
                   col_sq: torch.Tensor, fresh: bool = False) -> None:
    """Multiply out the columns that `stage` adds to the slots of one window (same units) for the rows still open
    (`pending`, group indices; None: all), every slot's columns side by side: one product into P's window per stage
    instead of one per slot (a slot of one column, a bias, would otherwise cost a pass over the window for it).
    Also each row's squared difference from its partner over them (per slot) and every B unit's squared norm over
    them (`col_sq`). `fresh` (all rows open): the product is written over the window instead of added to it."""
    first = members[0]
    rows = None if pending is None else local_rows(pending, first)
    if rows is not None and not len(rows):
        return  # no row open in this window (its columns are read by its rows only)
    taken = [(sl, t) for sl in members if (t := sl.take(stage)) is not None]
    if not taken:
        if fresh:
            window(P, first.slot).zero_()
        return
    n = first.slot.length
    widths = [t[1][0].numel() for _, t in taken]
    # The window's columns side by side, widened to fp32 (exactly, for 16-bit and fp32 inputs) in one copy each.
    r = n if rows is None else len(rows)
    a = torch.empty(r, sum(widths), dtype=torch.float32, device=P.device)
    b = torch.empty(n, sum(widths), dtype=torch.float32, device=P.device)
    lo = 0
    for (_, (ta, tb)), k in zip(taken, widths, strict=True):
        b[:, lo:lo + k].unflatten(1, tb.shape[1:]).copy_(tb)
        a[:, lo:lo + k].unflatten(1, ta.shape[1:]).copy_(ta if rows is None else ta.index_select(0, rows))
        lo += k
    local = first.local  # the same for every slot of the window (cur's window)
    partner = b if local is None else b.index_select(0, local)
    # The products first; then a and b, fresh copies, are squared in place (no further matrices of their size).
    if rows is None:
        if fresh:
            window(P, first.slot).addmm_(a, b.T, beta=0)  # beta 0: the window's old contents are not read
        else:
            window(P, first.slot).addmm_(a, b.T)
        d = a.sub_(partner).square_()
    else:
        if fresh:
            raise ValueError("a fresh window needs every row open")
        window(P, first.slot).index_add_(0, rows, a @ b.T)
        d = a.sub_(partner.index_select(0, rows)).square_()
    col_sq[first.lo:first.hi] += b.square_().sum(dim=1).double()
    lo = 0
    for (sl, _), k in zip(taken, widths, strict=True):
        part = d[:, lo:lo + k].sum(dim=1).double()
        if rows is None:
            sl.d_s += part
        else:
            sl.d_s.index_add_(0, rows, part)
        lo += k
