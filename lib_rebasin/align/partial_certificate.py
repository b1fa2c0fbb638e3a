"""Proving a group's current permutation optimal from part of its cost matrix's arithmetic.

Fine-tunes of one base keep every unit in place: the current permutation `cur` is the optimum of the assignment
problem on the cost matrix C = sum over slots of A_s B_s^T, and a visit only has to *prove* that. The full matrix
costs n^2 m multiply-adds per slot; this proof multiplies out only the first columns S of each slot. With a_i,
b_j a unit's rows (every slot's columns side by side), split into S and the remaining columns R:

Nearest partners. sum_i |a_i - b_sigma(i)|^2 = |A|^2 + |B|^2 - 2 sum_i C[i, sigma(i)] for every permutation
sigma, so the assignment maximising C minimises the distances, and if every row's current partner is its
strictly nearest unit of B, cur is the only optimum. (As LP duality: u_i + v_j >= C[i, j] with equality on the
current pairs, v_j = 1/2 |b_j|^2; no norm of B enters the comparison, whereas a row-argmax bound has to beat the
largest row norm of B.) A distance over S is a lower bound of the whole one, so row i is proven when

    |a_S,i - b_S,j|^2 = |a_S,i|^2 + |b_S,j|^2 - 2 P[i, j]  >  |a_i - b_cur(i)|^2     for all j != cur(i),

P the products over S; equivalently, with D_i = |a_R,i - b_R,cur(i)|^2 the partner's distance over R,

    max over j != cur(i) of (P[i, j] - 1/2 |b_S,j|^2)  <  P[i, cur(i)] - 1/2 |b_S,cur(i)|^2 - 1/2 D_i.

The margin is the products of the partners over S against the fine-tune's own difference over R: a small share
does. It grows (a first stage of `FIRST_COLUMNS`, then `SHARES`) for the rows still open until every row holds or
half the columns are in. A row proven at one share stays proven: its inequality bounds the whole distances, which
do not depend on the share.

Rounding. Each entry of the fp32 matrix the full path would compute lies within g_C |a_i| |b_j| of the exact value,
and each of this proof's fp32 products over S within g_S |a_i| |b_j| (g = gamma_N, N: the longest slot, plus one
accumulation per slot added into the same entry, plus one; for this proof, which multiplies out the columns of all
slots that fill the same units side by side, one product per stage, the columns of such a window multiplied out so
far, plus one accumulation per stage, plus one; or, for a window where that is the larger (`joined_stages`), one
product per slot as the full path, its longest slot's columns so far plus one accumulation per slot and stage, or
the first stage side by side and the later ones slot by slot, its longest product's columns plus its products
(`rounding_depth`); whatever the summation order; the error is relative to sum_k |a_k b_k| <= |a_i| |b_j|); the
computed |b_S,j|^2 (s~_j) and the squared norms and differences (sums of non-negative terms) are within gamma of
theirs. With v_j = (1/2 + g_C / 2 + g*) |b_j|^2, g* the proof's bound at its last share (so v is the same at every
share), every error that depends on j joins v_j, the rest the row's side, and the proven inequality becomes

    max_{j != cur(i)} (P~[i, j] - 1/2 s~_j)  <  P~[i, cur(i)] - 1/2 s~_cur(i) - 1/2 D_i - w_i,
    w_i = ((g_C + g_S) / 2 + 8 u) (|a_i| + |b_cur(i)|)^2 + (g* + 2 u) |b_cur(i)|^2

(s~ the computed |b_S,j|^2; D_i and the norms upper bounds, widened by their rounding bound; 8 u for the fp32 and
float64 operations of the comparison). Then cur is the only optimum of the exact matrix and of the fp32 one, and
skipping the visit changes nothing: the full path's row-argmax, if it is a legal permutation, has every row at
least at cur's value, so it is cur; else its structured solve (whole-head and GroupNorm symmetries included: cur is
optimal among all permutations, so among the legal ones) returns some sigma that it accepts only if its float64
sum beats cur's by the relative tolerance 1e-7, which cannot happen: sigma's exact value is below cur's and each
float64 sum of n entries is off by at most (n + 2) 2^-52 |A|_F |B|_F, which the proof checks is below that
tolerance of a lower bound of cur's value. The bf16 screen certifies a row-argmax of the exact matrix, and only cur
can be one. The -inf between attention halves never binds (no legal permutation goes there). Weight matching
records the visit as certified; the full path would record a solve instead when its row-argmax is not a
permutation though cur is optimal (then the proof saved that solve). On a GPU all this holds as long as fp32
matmuls are not run in TF32 (PyTorch's default).

Reading. The norms and differences over all columns come from one pass over each tensor that serves all its axes,
kept for the run, as long as neither the tensor's other axes nor the group itself are permuted (same-base pairs:
always); otherwise from the visit's own rows. A visit then needs only the columns S of its slots: where the run's
groups are given (a model re-read on each visit), that pass also keeps the columns the first share of each of the
key's groups multiplies out, until the key's last planned visit, so a visit proven at the first share reads nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from ..archspec import ArchSpec, Group, Slot
from .cost import empty_cost, other_axes_permuted, unit_rows
from .match_tensors import MatchTensors
from .permute import Perms, axis_index
from .proof_windows import U_FP32, ProofSlot, add_window, fills, gamma, joined_stages, rounding_depth, windows_of

TensorGetter = Callable[[str], torch.Tensor]

# Shares of each slot's inner columns multiplied out, in turn for the rows still open (at least MIN_COLUMNS columns
# over the group's slots). Other units' distances over S against the partner's whole distance: a small share
# usually does; unrelated models fail at every share.
SHARES = (64, 16, 4, 2)
MIN_COLUMNS = 128
# A first, smaller stage multiplies out a prefix of the first share's columns (which are the ones kept from the
# statistics pass, so failing it reads nothing more): half of them, at least FIRST_COLUMNS. Fine-tunes of one base
# mostly hold there already (synthetic SD 1.5 pair, delta 0.05: most groups whole, some rows of the others left to
# the first share), at half the products' cost (n^2 per column). A quarter of the columns (1/256) left 3x as many
# rows to the first share, whose products then cost more than the stage saved.
FIRST_SHARE, FIRST_COLUMNS = 128, 64
# Attempts after which a proof that failed on most of them is switched off for the rest of the search (unrelated
# models: the full matrix is needed anyway).
PROBE = 16
# ... and attempts after which a proof that won none of them is switched off: unrelated models fail from the first
# visit on (each failure costs products a full matrix then repeats), fine-tunes of one base win nearly every one.
PROBE_NONE = 8
_BLOCK = 1 << 19  # elements widened to fp32 at a time by the row statistics (two reused buffers, cache-sized)
_EXACT_IN_FP32 = (torch.float16, torch.bfloat16, torch.float32)  # stored dtypes fp32 holds exactly
_ROW_BLOCK = 256


def _row_stats(a: torch.Tensor, b: torch.Tensor, axes: tuple[int, ...]) -> dict[int, tuple[torch.Tensor, float]]:
    """For each of `axes`: the sums over all other dims of a^2 and (a - b)^2 (float64, shape (2, size)), and the
    relative rounding bound e of those sums of non-negative terms (exact within factors 1 -+ e). B's norms follow
    from them: |b_i| <= |a_i| + |a_i - b_i|."""
    out = {x: torch.zeros(2, a.shape[x], dtype=torch.float64, device=a.device) for x in axes}
    if a.dim() == 0 or a.numel() == 0:
        return {x: (s, 0.0) for x, s in out.items()}
    row = max(1, a[0].numel())
    step = max(1, _BLOCK // row)
    buf = torch.empty(2, min(step, a.shape[0]) * row, dtype=torch.float32, device=a.device)  # reused per block
    for r0 in range(0, a.shape[0], step):
        ab, bb = a[r0:r0 + step], b[r0:r0 + step]
        sq, d = (t[:ab.numel()].view(ab.shape) for t in buf)
        sq.copy_(ab)
        if a.dtype in _EXACT_IN_FP32 and b.dtype in _EXACT_IN_FP32:
            # Both widened exactly, the difference rounded once in fp32 (within fp32's eps, below the stored
            # dtype's; a difference of two floats never underflows; an overflow gives inf, which no proof survives).
            d.copy_(bb).sub_(sq)
        else:
            d.copy_(ab - bb)  # either wider than fp32: the difference in the wider dtype, then rounded
        sq.square_()
        d.square_()
        for k, src in enumerate((sq, d)):
            for x in axes:
                if x == 0:
                    out[x][k, r0:r0 + step] = src.flatten(1).sum(dim=1) if src.dim() > 1 else src
                else:
                    # The leading dims first (whole rows added at a time), then the trailing ones of each unit.
                    t = src.flatten(0, x - 1).sum(dim=0)
                    out[x][k] += t.flatten(1).sum(dim=1) if t.dim() > 1 else t
    # The difference's rounding (squared: two eps), the square's, the sum's (any order: non-negative terms), the
    # float64 additions.
    eps = torch.finfo(a.dtype).eps if a.dtype.is_floating_point else 0.0
    return {x: (s, gamma(a.numel() // a.shape[x]) + 3 * eps + 4 * U_FP32) for x, s in out.items()}


def _nearest(P: torch.Tensor, col_sq: torch.Tensor, rows: torch.Tensor, cur: torch.Tensor) -> torch.Tensor:
    """For each of `rows` (ascending): max over j != cur(i) of P[i, j] - 1/2 |b_S,j|^2 (float64), a block of rows
    at a time into one reused buffer."""
    out = torch.empty(len(rows), dtype=torch.float64, device=P.device)
    half = (col_sq / 2).float()
    every = len(rows) == P.shape[0]  # all rows, in order: blocks of P itself, no gather
    buf = torch.empty(min(_ROW_BLOCK, len(rows)), P.shape[1], dtype=P.dtype, device=P.device)
    for lo in range(0, len(rows), _ROW_BLOCK):
        idx = rows[lo:lo + _ROW_BLOCK]
        q = buf[:len(idx)]
        if every:
            torch.sub(P[lo:lo + len(idx)], half, out=q)
        else:
            torch.index_select(P, 0, idx, out=q).sub_(half)
        q[torch.arange(len(idx), device=P.device), cur[idx]] = float("-inf")
        out[lo:lo + len(idx)] = q.amax(dim=1).double()
    return out


def _margin(P: torch.Tensor, col_sq: torch.Tensor, rows: torch.Tensor, cur: torch.Tensor, diff: torch.Tensor,
            widening: torch.Tensor) -> torch.Tensor:
    """For each of `rows`: P[i, cur(i)] - 1/2 |b_S,cur(i)|^2 - 1/2 D_i - widening_i (float64)."""
    part = cur[rows]
    return P[rows, part].double() - col_sq[part] / 2 - diff[rows] / 2 - widening[rows]


class CurrentProof:
    """Proofs for one weight-matching run: keeps each key's row statistics (a few floats per unit) for later
    visits, and, for the `groups` of the run, the columns each of its slots multiplies out at the first share, so
    that the one read that gives a key's statistics also serves the first share of every group it belongs to."""

    def __init__(self, spec: ArchSpec, get_a: TensorGetter, get_b: TensorGetter, device: torch.device,
                 groups: Iterable[Group] = ()) -> None:
        self.spec, self.get_a, self.get_b, self.device = spec, get_a, get_b, device
        self.stats: dict[str, dict[int, tuple[torch.Tensor, float]]] = {}
        # (key, axis) -> [slices of its column dim to keep, visits left]; then the kept columns of A and B.
        self.plan = _first_columns(spec, groups)
        self.kept: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        # The proof's matrix, reused from visit to visit: a fresh one of SD 1.5's largest groups (100 MB) costs
        # its page faults and the kernel's zeroing on every visit, several times the pass that zeroes it here.
        self.matrix: torch.Tensor | None = None

    def prove(self, group: Group, perms: Perms, current: torch.Tensor) -> bool:
        """True when `current` is provably the only optimal assignment of the group's exact cost matrix and of
        the fp32 matrix a visit would compute, so that the visit would keep it. False only means "not proven"."""
        proven = self._prove(group, perms, current)
        if not proven:
            self.matrix = None  # the visit computes its full matrix next: not both at once
        return proven

    def _prove(self, group: Group, perms: Perms, current: torch.Tensor) -> bool:
        n = group.size
        cur = current.to(self.device)
        slots = []
        for slot in group.slots:
            sl = self._slot(slot, perms, cur)
            if sl is None:
                return False
            slots.append(sl)
        # Each stage multiplies out the same fraction of every slot's columns, at least MIN_COLUMNS in all.
        total = sum(sl.m for sl in slots)
        fractions = [max(1 / s, MIN_COLUMNS / total) for s in SHARES]
        fractions.insert(0, min(fractions[0], max(1 / FIRST_SHARE, FIRST_COLUMNS / total)))
        stages = len(fractions)
        for sl in slots:
            sl.cut(fractions)
        # Rounding bounds (see the docstring): of the full path's fp32 matrix, and of this proof's sums at a stage
        # (each window's longest product so far, plus the products added into an entry).
        g_full = gamma(max(sl.m for sl in slots) + len(slots) + 1)
        windows = windows_of(slots)

        joined = [joined_stages(w, stages) for w in windows]

        def g_proof(stage: int) -> float:
            return gamma(max(rounding_depth(w, stage, j) for w, j in zip(windows, joined, strict=True)) + 1)

        g_last = g_proof(stages - 1)
        # Each row's squared norm and partner distance over all columns, as lower and upper bounds.
        low = torch.zeros(2, n, dtype=torch.float64, device=self.device)
        up = torch.zeros(2, n, dtype=torch.float64, device=self.device)
        for sl in slots:
            stats = torch.stack([sl.sq_a, sl.diff])
            low[:, sl.lo:sl.hi] += stats * (1 - sl.e)
            up[:, sl.lo:sl.hi] += stats * (1 + 2 * sl.e)
        na, nd = up.sqrt()
        nb = na + nd  # |b_cur(i)| <= |a_i| + |a_i - b_cur(i)|
        spread, b_sq = (na + nb) ** 2, nb ** 2
        # cur's value, C[i, cur(i)] = 1/2 (|a_i|^2 + |b_cur(i)|^2 - |a_i - b_cur(i)|^2), at least `value` in
        # either matrix; float64 sums of n entries, each at most (1 + g) |a_i| |b_j|, are off by at most `slip`.
        a_low = low[0].sqrt()
        b_low = (a_low - nd).clamp_(min=0)
        value = float((low[0] + b_low ** 2 - up[1]).sum()) / 2 - g_full * float((na * nb).sum())
        slip = (n + 2) * 2.0 ** -52 * (1 + g_full) * float(na.norm()) * float(nb.norm())
        if value < (2e7 + 1) * slip:
            return False  # the full path's acceptance test could not be shown to reject another permutation
        # -inf between attention halves; the windows are written over by the first stage's products (every row is
        # open then and every slot adds columns), so they are not zeroed first.
        P = empty_cost(group, self.device, self._storage(n * n), zeroed=not fills(windows, group))
        col_sq = torch.zeros(n, dtype=torch.float64, device=self.device)  # |b_S,j|^2
        pending: torch.Tensor | None = None  # rows still open (None: all)
        for stage in range(stages):
            for w, j in zip(windows, joined, strict=True):
                add_window(w, stage, P, pending, col_sq, stage < j, fresh=stage == 0)
            if stage + 1 < stages and all(sl.cuts[stage + 2] <= sl.cuts[stage + 1] for sl in slots):
                continue  # the next share adds nothing: no need to check this one
            diff = torch.zeros(n, dtype=torch.float64, device=self.device)
            for sl in slots:
                diff[sl.lo:sl.hi] += sl.rest_difference(stage)
            rows = torch.arange(n, device=self.device) if pending is None else pending
            widening = ((g_full + g_proof(stage)) / 2 + 8 * U_FP32) * spread + (g_last + 2 * U_FP32) * b_sq
            proven = _nearest(P, col_sq, rows, cur) < _margin(P, col_sq, rows, cur, diff, widening)
            pending = rows[~proven]
            if not len(pending):
                return True
        return False

    def _storage(self, size: int) -> torch.Tensor:
        """fp32 storage of at least `size` elements for the proof's matrix (the largest one asked so far)."""
        if self.matrix is None or self.matrix.numel() < size:
            self.matrix = None  # the smaller one goes before the larger one is made
            self.matrix = torch.empty(size, dtype=torch.float32, device=self.device)
        return self.matrix

    def _slot(self, slot: Slot, perms: Perms, cur: torch.Tensor) -> ProofSlot | None:
        local = cur[slot.start:slot.start + slot.length] - slot.start
        if not bool(((local >= 0) & (local < slot.length)).all()):
            return None  # not a legal permutation of this window
        same = torch.equal(local, torch.arange(slot.length, device=local.device))
        others = [x for x in self.spec.axes[slot.key] if x != slot.axis]
        if same and all(axis_index(self.spec, slot.key, x, perms) is None for x in others):
            # Neither the other axes nor this group moved: the key's statistics over all of it serve.
            fetched = None
            if slot.key not in self.stats:
                fetched, self.stats[slot.key] = self._fetch(slot.key)
                self._keep(slot.key, *fetched)
            s, e = self.stats[slot.key][slot.axis]
            stats = (s[:, slot.offset:slot.offset + slot.length], e)

            def rows(ta: torch.Tensor, tb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                return (ta.narrow(slot.axis, slot.offset, slot.length).movedim(slot.axis, 0),
                        tb.narrow(slot.axis, slot.offset, slot.length).movedim(slot.axis, 0))

            kept = self._kept(slot)
            if kept is None:
                return ProofSlot(slot, *rows(*(fetched or (self.get_a(slot.key), self.get_b(slot.key)))), None, stats)
            shape = self.spec.shapes[slot.key]
            return ProofSlot(slot, *rows(*kept), None, stats, cols=shape[_column_dim(slot.axis)],
                         more=lambda: rows(self.get_a(slot.key), self.get_b(slot.key)))
        ta, tb = self.get_a(slot.key), self.get_b(slot.key)
        a = unit_rows(ta, slot.axis, slot.offset, slot.length, ta.dtype)
        b = other_axes_permuted(self.spec, slot, tb, perms, tb.dtype)
        partner = b if same else b.index_select(0, local)
        s, e = _row_stats(a, partner, (0,))[0]
        return ProofSlot(slot, a, b, None if same else local, (s, e))

    def _fetch(self, key: str) -> tuple[tuple[torch.Tensor, torch.Tensor], dict[int, tuple[torch.Tensor, float]]]:
        """A key's tensors and their statistics. NaN and Inf survive the statistics (sums of squares of A and of
        B - A over every element; an overflow in them only sends the key to the check), so where the getters check
        each tensor for them (io/finite.GuardedGetter) finite statistics vouch for both and save that pass; where
        not, the tensors are read through the check, which refuses them (or zeroes them), as any read would."""
        axes = tuple(self.spec.axes[key])
        ga, gb = self.get_a, self.get_b
        if isinstance(ga, MatchTensors) and isinstance(gb, MatchTensors):
            ta, tb = ga.unchecked(key), gb.unchecked(key)
            if ta is not None and tb is not None and ta.dim() > 0:
                stats = _row_stats(ta, tb, axes)
                if bool(torch.isfinite(stats[axes[0]][0]).all()):
                    ga.vouch(key, ta)
                    gb.vouch(key, tb)
                    return (ta, tb), stats
        fetched = self.get_a(key), self.get_b(key)
        return fetched, _row_stats(*fetched, axes)

    def _keep(self, key: str, ta: torch.Tensor, tb: torch.Tensor) -> None:
        """Copies of the first columns of `key` that its planned slots multiply out at the first share."""
        for x in self.spec.axes[key]:
            planned = self.plan.get((key, x))
            if planned is not None and ta.dim() > 1:
                cut = (_column_dim(x), 0, planned[0])
                self.kept[key, x] = (ta.narrow(*cut).clone(), tb.narrow(*cut).clone())

    def _kept(self, slot: Slot) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The kept columns of the slot's key and axis; released after the last planned visit."""
        planned = self.plan.get((slot.key, slot.axis))
        kept = self.kept.get((slot.key, slot.axis))
        if planned is None or kept is None:
            return None
        planned[1] -= 1
        if planned[1] <= 0:
            del self.kept[slot.key, slot.axis]
        return kept


def _column_dim(axis: int) -> int:
    """The dim of a tensor whose slices are a slot's columns (the first dim after its units' axis)."""
    return 1 if axis == 0 else 0


def _first_columns(spec: ArchSpec, groups: Iterable[Group]) -> dict[tuple[str, int], list[int]]:
    """(key, axis) -> [slices of its column dim the first share multiplies out (the most over the groups that use
    it, as `ProofSlot.cut` computes them), the number of those slots]."""
    out: dict[tuple[str, int], list[int]] = {}
    for g in groups:
        dims = [(s, list(spec.shapes[s.key])) for s in g.slots]
        ms = [math.prod(shape) // max(1, shape[s.axis]) if len(shape) > 1 else 1 for s, shape in dims]
        f = max(1 / SHARES[0], MIN_COLUMNS / sum(ms))
        for (s, shape), m in zip(dims, ms, strict=True):
            if len(shape) < 2:
                continue
            cols = shape[_column_dim(s.axis)]
            cut = min(cols, math.ceil(math.ceil(f * m) / (m // cols)))
            planned = out.setdefault((s.key, s.axis), [0, 0])
            planned[0] = max(planned[0], cut)
            planned[1] += 1
    return out


def prove_current(spec: ArchSpec, group: Group, get_a: TensorGetter, get_b: TensorGetter, perms: Perms,
                  current: torch.Tensor, device: torch.device) -> bool:
    """One proof on its own (`CurrentProof.prove`, without statistics kept for later visits)."""
    return CurrentProof(spec, get_a, get_b, device).prove(group, perms, current)
