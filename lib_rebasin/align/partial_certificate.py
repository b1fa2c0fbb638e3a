"""Proving a group's current permutation optimal from part of its cost matrix's arithmetic.

Fine-tunes of one base keep every unit in place: row-argmax of the cost matrix C = sum over slots of A_s B_s^T is
the current permutation, and a visit only has to *prove* that. The full matrix costs n^2 m multiply-adds per slot;
this proof computes the products over the first k of the m inner columns exactly and bounds the other m - k by
norms. With a_i, b_j a unit's rows split into computed (S) and remaining (R) columns,

    C[i, j] = <a_S,i, b_S,j> + <a_R,i, b_R,j>,   |<a_R,i, b_R,j>| <= |a_R,i| |b_R,j|   (Cauchy-Schwarz),

and the current pair's remainder <a_R,i, b_R,cur(i)> is one dot product per row (O(n m), not O(n^2 m)). If for
every row the current pair's lower bound beats every other allowed column's upper bound, the current permutation
is the exact row-argmax: optimal, and a visit finds nothing to change.

The proof also covers the fp32 arithmetic of the full path: every bound is widened by a rigorous rounding-error
bound of an fp32 inner product of the group's total length (gamma_N |a_i| |b_j|, N the inner size plus one
accumulation per slot), once for its own sums and once for the full fp32 matrix the visit would otherwise compute.
So when it succeeds, that matrix's row-argmax is the current permutation too, and skipping it changes no result
(weight matching then records the visit as certified, exactly as the full path would).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..sd1.spec import ArchSpec, Group
from .cost import empty_cost, other_axes_permuted, unit_rows, window
from .permute import Perms

TensorGetter = Callable[[str], torch.Tensor]

# Share of each slot's inner columns computed exactly (at least MIN_COLUMNS, or all of a small slot). Same-base
# pairs keep their units' rows nearly parallel, so a small share separates the current pair from the rest.
SHARE = 8
MIN_COLUMNS = 256
# Attempts after which a proof that failed on most of them is switched off for the rest of the search (unrelated
# models: the full matrix is needed anyway).
PROBE = 16
_U = 2.0 ** -24  # unit roundoff of fp32


def prove_current(spec: ArchSpec, group: Group, get_a: TensorGetter, get_b: TensorGetter, perms: Perms,
                  current: torch.Tensor, device: torch.device) -> bool:
    """True when `current` is provably the row-argmax of the group's exact cost matrix, with a margin larger than
    the rounding error of computing that matrix in fp32. False only means "not proven"."""
    n = group.size
    P = empty_cost(group, device)  # -inf where no legal permutation goes (between attention halves)
    # Squared row norms over all columns and over the remaining ones, and <a_R,i, b_R,cur(i)>.
    full_a, full_b, rest_a, rest_b, rest_diag = torch.zeros(5, n, dtype=torch.float64, device=device)
    cur = current.to(device)
    inner = 0
    for slot in group.slots:
        a = unit_rows(get_a(slot.key), slot.axis, slot.offset, slot.length)
        b = other_axes_permuted(spec, slot, get_b(slot.key), perms)
        m = a.shape[1]
        inner += m + 1
        k = m if m <= MIN_COLUMNS else max(MIN_COLUMNS, math.ceil(m / SHARE))
        lo, hi = slot.start, slot.start + slot.length
        window(P, slot).addmm_(a[:, :k], b[:, :k].T)
        if k == m:
            full_a[lo:hi] += _squared_norms(a)
            full_b[lo:hi] += _squared_norms(b)
            continue
        ar, br = a[:, k:], b[:, k:]
        sq_a, sq_b = _squared_norms(ar), _squared_norms(br)
        rest_a[lo:hi] += sq_a
        rest_b[lo:hi] += sq_b
        full_a[lo:hi] += sq_a + _squared_norms(a[:, :k])
        full_b[lo:hi] += sq_b + _squared_norms(b[:, :k])
        # The current partner of each row, where it lies inside this slot's window (else the slot adds nothing).
        local = cur[lo:hi] - lo
        inside = (local >= 0) & (local < slot.length)
        partner = br if _is_range(local) else br.index_select(0, local.clamp(0, slot.length - 1))
        rest_diag[lo:hi] += torch.einsum("ij,ij->i", ar, partner).double() * inside
    # gamma_N bounds the error of one fp32 inner product of length N relative to sum |a_k b_k| <= |a_i| |b_j|;
    # four of them cover this proof's sums and norms and the full fp32 matrix's, on both sides of the comparison,
    # and 32 u the few fp32 operations that form the upper bounds below (each at most 3 |a_i| |b_j|).
    gamma = inner * _U / (1 - inner * _U)
    eps = 4 * gamma + 32 * _U
    na, nb = full_a.sqrt().mul_(1 + eps), full_b.sqrt().mul_(1 + eps)
    ra, rb = rest_a.sqrt().mul_(1 + eps), rest_b.sqrt().mul_(1 + eps)
    rows = torch.arange(n, device=device)
    lower = P[rows, cur].double() + rest_diag - eps * na * nb[cur]
    upper = P.addr_(ra.float(), rb.float()).addr_(na.float(), nb.float(), alpha=eps)
    upper[rows, cur] = float("-inf")
    return bool((lower > upper.max(dim=1).values.double()).all())


def _squared_norms(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x, dim=1).double().square()


def _is_range(idx: torch.Tensor) -> bool:
    return bool(torch.equal(idx, torch.arange(len(idx), device=idx.device)))
