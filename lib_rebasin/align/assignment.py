"""Linear assignment under GroupNorm structure.

`solve(C, structure)` returns the permutation `perm` (row i of model A takes unit perm[i] of model B) maximising
sum_i C[i, perm[i]] among the permutations `structure` allows:

- free groups: one `scipy.optimize.linear_sum_assignment(C, maximize=True)`;
- hierarchical GroupNorm blocks (levels b1 | b2 | ...): exact, bottom-up. The value of sending block J of B onto
  block I of A is itself an assignment problem over their sub-blocks, so we solve every pair at the finest level,
  then assign sub-blocks inside every pair of the next level, and so on; the top level is one small assignment.
  Reconstruction walks back down only through the chosen pairs;
- fixed intervals (partitions that straddle each other): one assignment per interval (block-structured inside
  it when the group's own GroupNorm blocks fit the intervals);
- attention heads (`shared_blocks`): the value of sending head J of B onto head I of A is the best q/k assignment
  of that pair plus the best v/o assignment, V[I, J] = LAP(qk block I,J) + LAP(vo block I,J); one assignment over
  heads, then the within-head assignments of the chosen pairs. Exact: for a fixed head order the two halves are
  independent problems.

Before any of that, the row-argmax certificate: if every row's best column is distinct and the resulting
permutation is legal, it is optimal (no assignment can beat every row's maximum), so no solve is needed. For
fine-tunes of one base this is the common case and it costs one pass over C.
"""

from __future__ import annotations

import numpy as np
import torch

from ..archspec import Structure
from .permute import is_legal


def row_argmax_certificate(C: torch.Tensor, structure: Structure) -> torch.Tensor | None:
    """The optimal permutation if row-argmax already is a legal one, else None."""
    best = C.argmax(dim=1)
    return best if is_legal(structure, best) else None


def lap(C: np.ndarray) -> tuple[np.ndarray, float]:
    # Imported at the first solve: a merge that solves nothing (a weighted sum, or a re-basin of fine-tunes of one
    # base whose every visit is certified) does not pay for importing scipy.optimize.
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(C, maximize=True)
    return cols, float(C[rows, cols].sum())


def solve(C: np.ndarray, structure: Structure) -> np.ndarray:
    """Optimal legal permutation for cost matrix C (float64, n x n)."""
    n = C.shape[0]
    if structure.shared_blocks:
        return _shared_blocks(C, structure.shared_blocks)
    if structure.intervals:
        perm = np.empty(n, dtype=np.int64)
        for lo, hi in structure.intervals:
            perm[lo:hi] = lo + _within(C[lo:hi, lo:hi], structure.levels)
        return perm
    return _within(C, structure.levels)


def _within(C: np.ndarray, levels: tuple[int, ...]) -> np.ndarray:
    return _hierarchical(C, levels) if levels else lap(C)[0]


def _shared_blocks(C: np.ndarray, b: int) -> np.ndarray:
    """Both halves of C (the cross-half entries are never read) take one block order; free inside blocks."""
    half = C.shape[0] // 2
    halves = [C[:half, :half], C[half:, half:]]
    heads, _ = lap(_block_values(halves[0], b) + _block_values(halves[1], b))
    perm = np.empty(2 * half, dtype=np.int64)
    for lo, H in zip((0, half), halves, strict=True):
        for i, j in enumerate(heads):
            cols, _ = lap(H[i * b:(i + 1) * b, j * b:(j + 1) * b])
            perm[lo + i * b:lo + (i + 1) * b] = lo + j * b + cols
    return perm


def _block_values(C: np.ndarray, b: int) -> np.ndarray:
    """V[I, J] = best assignment value of C[block I, block J] for blocks of size b (all pairs).

    Applied to a matrix of block values it gives the values of the next, coarser level."""
    m = C.shape[0] // b
    blocks = C.reshape(m, b, m, b).transpose(0, 2, 1, 3)
    V = np.empty((m, m))
    for i in range(m):
        for j in range(m):
            V[i, j] = lap(blocks[i, j])[1]
    return V


def _hierarchical(C: np.ndarray, levels: tuple[int, ...]) -> np.ndarray:
    n = C.shape[0]
    # values[k][I, J]: best value of mapping level-k block J (of B) onto level-k block I (of A).
    values = [_block_values(C, levels[0])]
    for k in range(1, len(levels)):
        values.append(_block_values(values[-1], levels[k] // levels[k - 1]))
    top_cols, _ = lap(values[-1])
    # Walk down: at each level, the chosen (I -> J) block pairs refine into sub-block pairs.
    pairs = [(i, int(j)) for i, j in enumerate(top_cols)]
    for k in range(len(levels) - 1, 0, -1):
        ratio = levels[k] // levels[k - 1]
        prev = values[k - 1]
        refined = []
        for i, j in pairs:
            sub = prev[i * ratio:(i + 1) * ratio, j * ratio:(j + 1) * ratio]
            cols, _ = lap(sub)
            refined += [(i * ratio + a, j * ratio + int(c)) for a, c in enumerate(cols)]
        pairs = refined
    b = levels[0]
    perm = np.empty(n, dtype=np.int64)
    for i, j in pairs:
        cols, _ = lap(C[i * b:(i + 1) * b, j * b:(j + 1) * b])
        perm[i * b:(i + 1) * b] = j * b + cols
    return perm
