"""Proving a group's current permutation optimal from part of its cost matrix's arithmetic.

Fine-tunes of one base keep every unit in place: row-argmax of the cost matrix C = sum over slots of A_s B_s^T is
the current permutation, and a visit only has to *prove* that. The full matrix costs n^2 m multiply-adds per slot;
this proof computes the products over the first k of the m inner columns exactly and bounds the other m - k by
norms. With a_i, b_j a unit's rows split into computed (S) and remaining (R) columns,

    C[i, j] = <a_S,i, b_S,j> + <a_R,i, b_R,j>,   |<a_R,i, b_R,j>| <= |a_R,i| |b_R,j|   (Cauchy-Schwarz),

and the current pair's value C[i, cur(i)] is one dot product per row over all columns (O(n m), not O(n^2 m)). If
for every row that value's lower bound beats every other allowed column's upper bound, the current permutation is
the exact row-argmax: optimal, and a visit finds nothing to change. The computed share grows (`SHARES`) until the
proof holds or half the columns are in; each step computes only the chunk it adds.

The proof also covers the fp32 arithmetic of the full path: every bound is widened by a rigorous rounding-error
bound of an fp32 inner product of the group's total length (gamma_N |a_i| |b_j|, N the inner size plus one
accumulation per chunk), once for its own sums and once for the full fp32 matrix the visit would otherwise
compute. So when it succeeds, that matrix's row-argmax is the current permutation too, and skipping it changes no
result (weight matching then records the visit as certified, exactly as the full path would). On a GPU this
holds as long as fp32 matmuls are not run in TF32 (PyTorch's default).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..archspec import ArchSpec, Group
from .cost import empty_cost, other_axes_permuted, unit_rows, window
from .permute import Perms

TensorGetter = Callable[[str], torch.Tensor]

# Shares of each slot's inner columns computed exactly, tried in turn until the proof holds (at least MIN_COLUMNS
# columns, or all of a small slot). Units that keep their place in a fine-tune keep their rows nearly parallel, so
# a small share usually separates the current pair from the rest; a group whose exactly computed small slots (norm
# gains near 1 for every unit) take much of the margin needs a larger one.
SHARES = (16, 4, 2)
MIN_COLUMNS = 256
# Attempts after which a proof that failed on most of them is switched off for the rest of the search (unrelated
# models: the full matrix is needed anyway).
PROBE = 16
_U = 2.0 ** -24  # unit roundoff of fp32
_ROW_BLOCK = 256


class _Slot:
    """One slot's rows of A and B (stored dtype), its column cuts, and the squared row norms of each chunk."""

    def __init__(self, lo: int, a: torch.Tensor, b: torch.Tensor) -> None:
        m = a.shape[1]
        self.lo, self.hi, self.a, self.b = lo, lo + a.shape[0], a, b
        self.cuts = [0] + [m if m <= MIN_COLUMNS else min(m, max(MIN_COLUMNS, math.ceil(m / s))) for s in SHARES]
        self.cuts.append(m)
        self.sq_a: list[torch.Tensor] = []
        self.sq_b: list[torch.Tensor] = []

    def stacked(self, c: int) -> torch.Tensor:
        """Chunk `c` of the columns in fp32, A's and B's rows side by side: (rows, 2, chunk length)."""
        lo, hi = self.cuts[c], self.cuts[c + 1]
        out = torch.empty(self.a.shape[0], 2, hi - lo, dtype=torch.float32, device=self.a.device)
        out[:, 0].copy_(self.a[:, lo:hi])
        out[:, 1].copy_(self.b[:, lo:hi])
        return out

    def chunk(self, c: int, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Chunk `c` of the columns in fp32: A's rows (those of `rows` only, if given) and all of B's."""
        lo, hi = self.cuts[c], self.cuts[c + 1]
        a = self.a[:, lo:hi] if rows is None else self.a[rows, lo:hi]
        return a.float(), self.b[:, lo:hi].float()


def prove_current(spec: ArchSpec, group: Group, get_a: TensorGetter, get_b: TensorGetter, perms: Perms,
                  current: torch.Tensor, device: torch.device) -> bool:
    """True when `current` is provably the row-argmax of the group's exact cost matrix, with a margin larger than
    the rounding error of computing that matrix in fp32. False only means "not proven"."""
    n = group.size
    P = empty_cost(group, device)  # -inf where no legal permutation goes (between attention halves)
    diag = torch.zeros(n, dtype=torch.float64, device=device)  # C[i, cur(i)], all columns
    cur = current.to(device)
    slots: list[_Slot] = []
    longest = additions = 0
    for slot in group.slots:
        ta, tb = get_a(slot.key), get_b(slot.key)
        sl = _Slot(slot.start, unit_rows(ta, slot.axis, slot.offset, slot.length, ta.dtype),
                   other_axes_permuted(spec, slot, tb, perms, tb.dtype))
        slots.append(sl)
        longest = max(longest, sl.a.shape[1])
        additions += len(sl.cuts)
        # The current partner of each row, where it lies inside this slot's window (else the slot adds nothing).
        local = cur[sl.lo:sl.hi] - sl.lo
        inside = (local >= 0) & (local < slot.length)
        same = _is_range(local)
        for c in range(len(sl.cuts) - 1):
            # A's and B's rows side by side in fp32: one batched product gives both squared norms and the
            # current pair's value of every row (three fp32 inner products each, no separate passes).
            ab = sl.stacked(c)
            a, b = ab[:, 0], ab[:, 1]
            gram = torch.bmm(ab, ab.transpose(1, 2))
            sl.sq_a.append(gram[:, 0, 0].double())
            sl.sq_b.append(gram[:, 1, 1].double())
            pair = gram[:, 0, 1] if same else torch.einsum(
                "ij,ij->i", a, b.index_select(0, local.clamp(0, slot.length - 1)))
            diag[sl.lo:sl.hi] += pair.double() * inside
            if c == 0:
                window(P, slot).addmm_(a, b.T)
    # gamma_N bounds the error of an fp32 sum of products relative to sum |a_k b_k| <= |a_i| |b_j| when no product
    # goes through more than N - 1 roundings (one multiplication, then additions): within one slot's product at
    # most its length (any summation order), then one addition per chunk or slot added into the same entry. Four
    # of them cover this proof's sums and norms and the full fp32 matrix's, on both sides of the comparison, and
    # 32 u the few fp32 operations that form the upper bounds (each at most 3 |a_i| |b_j|).
    inner = longest + additions + 1
    gamma = inner * _U / (1 - inner * _U)
    eps = 4 * gamma + 32 * _U
    na, nb = _norms(slots, n, 0, device, eps)
    lower = diag - eps * na * nb[cur]
    # The proof is one inequality per row: a row proven at one share stays proven, and the next share's columns
    # are multiplied out for the rows still open only.
    pending = torch.arange(n, device=device)
    for stage in range(1, len(SHARES) + 1):
        if stage > 1:
            for sl, slot in zip(slots, group.slots, strict=True):
                open_rows = pending[(pending >= sl.lo) & (pending < sl.hi)] - sl.lo
                if sl.cuts[stage] > sl.cuts[stage - 1] and len(open_rows):
                    a, b = sl.chunk(stage - 1, open_rows)
                    window(P, slot).index_add_(0, open_rows, a @ b.T)
        ra, rb = _norms(slots, n, stage, device, eps)
        proven = lower[pending] > _best_other(P, pending, cur, ra, rb, na, nb, eps)
        pending = pending[~proven]
        if not len(pending):
            return True
    return False


def _best_other(P: torch.Tensor, rows: torch.Tensor, cur: torch.Tensor, ra: torch.Tensor, rb: torch.Tensor,
                na: torch.Tensor, nb: torch.Tensor, eps: float) -> torch.Tensor:
    """For each of `rows`, the largest upper bound P[i, j] + |a_R,i| |b_R,j| + eps |a_i| |b_j| over columns
    j != cur(i), a block of rows at a time (no second matrix of P's size)."""
    out = torch.empty(len(rows), dtype=torch.float64, device=P.device)
    rb, nb = rb.float(), nb.float()
    for lo in range(0, len(rows), _ROW_BLOCK):
        idx = rows[lo:lo + _ROW_BLOCK]
        upper = P.index_select(0, idx).addr_(ra[idx].float(), rb).addr_(na[idx].float(), nb, alpha=eps)
        upper[torch.arange(len(idx), device=P.device), cur[idx]] = float("-inf")
        out[lo:lo + len(idx)] = upper.max(dim=1).values
    return out


def _norms(slots: list[_Slot], n: int, first: int, device: torch.device, eps: float
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Row norms of A and B over the chunks from `first` on (all chunks: 0), widened by (1 + eps)."""
    sq = torch.zeros(2, n, dtype=torch.float64, device=device)
    for sl in slots:
        for c in range(first, len(sl.sq_a)):
            sq[0, sl.lo:sl.hi] += sl.sq_a[c]
            sq[1, sl.lo:sl.hi] += sl.sq_b[c]
    out = sq.sqrt_().mul_(1 + eps)
    return out[0], out[1]


def _is_range(idx: torch.Tensor) -> bool:
    return bool(torch.equal(idx, torch.arange(len(idx), device=idx.device)))
