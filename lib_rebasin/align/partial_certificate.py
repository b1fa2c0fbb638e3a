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

    def chunk(self, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self.cuts[c], self.cuts[c + 1]
        return self.a[:, lo:hi].float(), self.b[:, lo:hi].float()


def prove_current(spec: ArchSpec, group: Group, get_a: TensorGetter, get_b: TensorGetter, perms: Perms,
                  current: torch.Tensor, device: torch.device) -> bool:
    """True when `current` is provably the row-argmax of the group's exact cost matrix, with a margin larger than
    the rounding error of computing that matrix in fp32. False only means "not proven"."""
    n = group.size
    P = empty_cost(group, device)  # -inf where no legal permutation goes (between attention halves)
    diag = torch.zeros(n, dtype=torch.float64, device=device)  # C[i, cur(i)], all columns
    cur = current.to(device)
    slots: list[_Slot] = []
    inner = 0
    for slot in group.slots:
        ta, tb = get_a(slot.key), get_b(slot.key)
        sl = _Slot(slot.start, unit_rows(ta, slot.axis, slot.offset, slot.length, ta.dtype),
                   other_axes_permuted(spec, slot, tb, perms, tb.dtype))
        slots.append(sl)
        inner += sl.a.shape[1] + len(sl.cuts)
        # The current partner of each row, where it lies inside this slot's window (else the slot adds nothing).
        local = cur[sl.lo:sl.hi] - sl.lo
        inside = (local >= 0) & (local < slot.length)
        same = _is_range(local)
        for c in range(len(sl.cuts) - 1):
            a, b = sl.chunk(c)
            sl.sq_a.append(_squared_norms(a))
            sl.sq_b.append(_squared_norms(b))
            partner = b if same else b.index_select(0, local.clamp(0, slot.length - 1))
            diag[sl.lo:sl.hi] += torch.einsum("ij,ij->i", a, partner).double() * inside
            if c == 0:
                window(P, slot).addmm_(a, b.T)
    # gamma_N bounds the error of one fp32 inner product of length N relative to sum |a_k b_k| <= |a_i| |b_j|;
    # four of them cover this proof's sums and norms and the full fp32 matrix's, on both sides of the comparison,
    # and 32 u the few fp32 operations that form the upper bounds (each at most 3 |a_i| |b_j|).
    gamma = inner * _U / (1 - inner * _U)
    eps = 4 * gamma + 32 * _U
    na, nb = _norms(slots, n, 0, device, eps)
    lower = diag - eps * na * nb[cur]
    for stage in range(1, len(SHARES) + 1):
        if stage > 1:
            for sl, slot in zip(slots, group.slots, strict=True):
                if sl.cuts[stage] > sl.cuts[stage - 1]:
                    a, b = sl.chunk(stage - 1)
                    window(P, slot).addmm_(a, b.T)
        ra, rb = _norms(slots, n, stage, device, eps)
        if bool((lower > _best_other(P, cur, ra, rb, na, nb, eps)).all()):
            return True
    return False


def _best_other(P: torch.Tensor, cur: torch.Tensor, ra: torch.Tensor, rb: torch.Tensor, na: torch.Tensor,
                nb: torch.Tensor, eps: float) -> torch.Tensor:
    """Per row, the largest upper bound P[i, j] + |a_R,i| |b_R,j| + eps |a_i| |b_j| over columns j != cur(i), a
    block of rows at a time (no second matrix of P's size)."""
    out = torch.empty(P.shape[0], dtype=torch.float64, device=P.device)
    rb, nb = rb.float(), nb.float()
    for lo in range(0, P.shape[0], _ROW_BLOCK):
        hi = min(lo + _ROW_BLOCK, P.shape[0])
        upper = P[lo:hi].clone().addr_(ra[lo:hi].float(), rb).addr_(na[lo:hi].float(), nb, alpha=eps)
        upper[torch.arange(hi - lo, device=P.device), cur[lo:hi]] = float("-inf")
        out[lo:hi] = upper.max(dim=1).values
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


def _squared_norms(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x, dim=1).double().square()


def _is_range(idx: torch.Tensor) -> bool:
    return bool(torch.equal(idx, torch.arange(len(idx), device=idx.device)))
