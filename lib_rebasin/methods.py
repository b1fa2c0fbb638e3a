"""The merge methods: one registry entry each, a small pure function over fp32 tensors per key.

A method's function is `fn(a, b, c, alpha, params, rng) -> tensor`: `a`, `b`, `c` are one key's fp32 values (c is
None unless the method needs C; with re-basin alignment b and c arrive already permuted onto A), `alpha` is the
weight of B for that key (its block's weight with block weights), `params` the method's parameters by name, and
`rng` a CPU generator seeded from (seed, key) so random methods give the same bytes on every run and device.

Linear methods also declare their coefficients on (A, B, C), so the merge can stream them through the exact
`Blend` fast path (`merge/blend.py`) instead of calling `fn`. Re-basin and legacy are not entries of their own kind:
re-basin is an alignment of B (and C) to A followed by a weighted sum, and composes with every method here
(`MergeOptions.align`); legacy reproduces one old tool exactly. `merge/run.py` handles those two paths.

Every parameter a method declares (`Param`, an `Option`) joins the option table (`options.OPTIONS`) and is a
`MergeOptions` field of the same name, so the CLI (`--ties-density`), recipes (`ties_density = 0.2`), provenance,
the HTTP API and the tab get it with no further edit: a new method is its function plus its `MethodInfo`.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from .option import Option

Tensor = torch.Tensor
KeyFn = Callable[[Tensor, Tensor, "Tensor | None", float, Mapping[str, object], torch.Generator], Tensor]


def Param(name: str, kind: type, low: float, high: float, default: float, label: str, help: str,
          low_open: bool = False) -> Option:
    """A method's numeric parameter: an `Option` (option.py) that applies to the methods listing it in `params`,
    shown as a slider, checked only for them (a recipe default for one method is no error in another's step)."""
    return Option(name, kind, default, label, help, low=low, high=high, low_open=low_open, applies=None,
                  inapplicable="ignore", widget="slider", step=1 if kind is int else 0.01,
                  recorded_when=lambda o: any(p.name == name for p in METHODS[o.method].params), method_param=True)


@dataclass(frozen=True)
class MethodInfo:
    name: str
    label: str
    needs_c: bool
    help: str
    fn: KeyFn | None = None                       # None only for the special paths (rebasin, legacy)
    linear: Callable[[float], tuple[float, float, float]] | None = None  # alpha -> weights of A, B, C
    params: tuple[Option, ...] = field(default_factory=tuple)  # its own options (`Param`), e.g. ties_density
    alpha_bounded: bool = True                    # alpha (and every block weight) in [0, 1]
    random: bool = False                          # uses rng (seeded by MergeOptions.seed)
    source: str = ""
    # What the interfaces ask of a method (option.py's `applies`, the tab's visibility), so none re-derives them
    # from its name:
    uses_alpha: bool = True                       # the result depends on alpha (and block weights)
    iterates: bool = False                        # uses `iterations` (steps alpha over N merges)
    aligns: bool = False                          # always re-basins B onto A (then tolerance, max_sweeps, matching)
    alignable: bool = True                        # accepts `align` (re-basin B, and C, onto A before the method)
    block_weights: bool = True                    # accepts block weights (per-block alpha)
    # Its result is (1 - a) A + a B' per key, for which "the parents' interpolated statistics" (REPAIR) is defined.
    repairable: bool = False


# -- the pure functions ----------------------------------------------------------------------------------------

def weighted_sum(a: Tensor, b: Tensor, c: Tensor | None, alpha: float, params: Mapping[str, object],
                 rng: torch.Generator) -> Tensor:
    """(1 - alpha) A + alpha B."""
    return (1 - alpha) * a + alpha * b


def add_difference(a: Tensor, b: Tensor, c: Tensor | None, alpha: float, params: Mapping[str, object],
                   rng: torch.Generator) -> Tensor:
    """A + alpha (B - C)."""
    assert c is not None
    return a + alpha * (b - c)


def train_difference(a: Tensor, b: Tensor, c: Tensor | None, alpha: float, params: Mapping[str, object],
                     rng: torch.Generator) -> Tensor:
    """A + 1.8 alpha |B - A| / (|B - A| + |B - C|) (B - C), elementwise; 0/0 counts as 0.

    SuperMerger's "trainDifference" calcmode (`traindiff` in scripts/mergers/mergers.py) and sd-mecha's
    `train_difference_mask` define the same factor: B's difference from its base C is added to A in full
    (x 1.8 alpha) where A sits far from B, and not at all where A already equals B; B = C adds nothing.
    """
    assert c is not None
    diff = b - c
    dist_ba = (b - a).abs()
    total = dist_ba + diff.abs()
    scale = torch.where(total > 0, dist_ba / torch.where(total > 0, total, torch.ones_like(total)),
                        torch.zeros_like(total))
    return a + (1.8 * alpha) * scale * diff


def trim_top(tau: Tensor, density: float) -> Tensor:
    """Keep the `density` fraction of entries with the largest magnitude (ties at the threshold kept), zero the rest."""
    n = tau.numel()
    if density >= 1.0 or n == 0:
        return tau
    keep = max(1, round(density * n))
    threshold = tau.abs().reshape(-1).kthvalue(n - keep + 1).values
    return torch.where(tau.abs() >= threshold, tau, torch.zeros_like(tau))


def sign_elected_mean(taus: list[Tensor], weights: list[float]) -> Tensor:
    """TIES' elect + disjoint merge: per entry, the sign of the weighted sum wins; the result is the weighted mean
    of the task vectors that have that sign (zero where none does)."""
    total = torch.zeros_like(taus[0])
    for w, t in zip(weights, taus, strict=True):
        total.add_(t, alpha=w)
    sign = torch.sign(total)
    num = torch.zeros_like(total)
    den = torch.zeros_like(total)
    for w, t in zip(weights, taus, strict=True):
        agree = (torch.sign(t) == sign) & (t != 0)
        num += torch.where(agree, w * t, torch.zeros_like(t))
        den += agree.to(t.dtype) * w
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))


def ties(a: Tensor, b: Tensor, c: Tensor | None, alpha: float, params: Mapping[str, object],
         rng: torch.Generator) -> Tensor:
    """TIES-merging (Yadav et al. 2023, arXiv 2306.01708) of the task vectors A - C and B - C, weighted 1 - alpha
    and alpha: trim each to its top `ties_density` fraction by magnitude (per tensor), elect the sign per entry,
    average the agreeing values, and add `ties_scale` times the result to C.

    With density 1 and no sign conflicts (and no zero entries) this is task arithmetic,
    C + scale ((1 - alpha)(A - C) + alpha (B - C)); at scale 1 that is the weighted sum.
    """
    assert c is not None
    density = float(params["ties_density"])  # type: ignore[arg-type]
    taus = [trim_top(a - c, density), trim_top(b - c, density)]
    return c + float(params["ties_scale"]) * sign_elected_mean(taus, [1 - alpha, alpha])  # type: ignore[arg-type]


def dare_drop(tau: Tensor, p: float, rng: torch.Generator) -> Tensor:
    """DARE (Yu et al. 2023, arXiv 2311.03099): drop each entry with probability p, rescale survivors by 1/(1-p).
    The mask is drawn on the CPU from `rng`, so it is the same on every device."""
    if p <= 0.0:
        return tau
    keep = (torch.rand(tau.shape, generator=rng) >= p).to(tau.device)
    return torch.where(keep, tau / (1.0 - p), torch.zeros_like(tau))


def dare(a: Tensor, b: Tensor, c: Tensor | None, alpha: float, params: Mapping[str, object],
         rng: torch.Generator) -> Tensor:
    """A + alpha DARE_p(B - C): add difference with B's task vector randomly sparsified (p = `dare_p`)."""
    assert c is not None
    return a + alpha * dare_drop(b - c, float(params["dare_p"]), rng)  # type: ignore[arg-type]


def dare_ties(a: Tensor, b: Tensor, c: Tensor | None, alpha: float, params: Mapping[str, object],
              rng: torch.Generator) -> Tensor:
    """DARE before TIES (as in Yu et al. 2023, sec. 4): sparsify A - C and B - C with DARE, then TIES' sign
    election and disjoint mean (weights 1 - alpha, alpha; no further trimming), scaled by `ties_scale`, added to C."""
    assert c is not None
    p = float(params["dare_p"])  # type: ignore[arg-type]
    taus = [dare_drop(a - c, p, rng), dare_drop(b - c, p, rng)]
    return c + float(params["ties_scale"]) * sign_elected_mean(taus, [1 - alpha, alpha])  # type: ignore[arg-type]


def magprune(tau: Tensor, p: float, eps: float, rng: torch.Generator) -> Tensor:
    """DELLA's MagPrune (Deep et al. 2024, arXiv 2406.11617): DARE whose drop probability falls with magnitude.

    Within each row (a tensor's first axis, the rest flattened; a 1-D tensor is one row) the entries are ranked by
    |tau| and entry i is dropped with probability p_i = p - eps (r_i - 1/2), where r_i in [0, 1] is its rank (0 the
    smallest, 1 the largest, ties in index order): p + eps/2 for the smallest, p - eps/2 for the largest, p on
    average. Survivors are rescaled by 1 / (1 - p_i), so every entry keeps its expected value. Probabilities
    outside [0, 1] are clipped (as sd-mecha does), so there an entry is always kept or always dropped.
    The ranks and the draw are computed on the CPU from `rng` (the same uniform draw as `dare_drop`), so the
    mask is the same on every device; with eps = 0 the result is `dare_drop`'s, bit for bit.
    """
    if (p <= 0.0 and eps == 0.0) or tau.numel() == 0:
        return tau
    rows = tau.detach().reshape(tau.shape[0] if tau.dim() > 1 else 1, -1).abs().cpu()
    n = rows.shape[1]
    order = torch.sort(rows, dim=1, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(n).expand_as(order))
    centred = (rank.to(torch.float32) - (n - 1) / 2) / max(n - 1, 1)      # in [-1/2, 1/2]
    drop = (p - eps * centred).clamp_(0.0, 1.0).reshape(tau.shape)
    keep_prob = ((1.0 - p) + eps * centred).clamp_(0.0, 1.0).reshape(tau.shape)
    keep = torch.rand(tau.shape, generator=rng) >= drop
    return torch.where(keep.to(tau.device), tau / keep_prob.to(tau.device), torch.zeros_like(tau))


def della(a: Tensor, b: Tensor, c: Tensor | None, alpha: float, params: Mapping[str, object],
          rng: torch.Generator) -> Tensor:
    """DELLA-merging (Deep et al. 2024): MagPrune the task vectors A - C and B - C (mean drop `dare_p`, window
    `della_eps`), elect signs and average the agreeing values (weights 1 - alpha, alpha), add `ties_scale` times
    the result to C. The paper's drop, elect, fuse; mergekit's `della` and sd-mecha's `add_ties_with_dare` with
    `della_eps` also elect signs over every model's task vector. With della_eps = 0 it is `dare_ties`."""
    assert c is not None
    p, eps = float(params["dare_p"]), float(params["della_eps"])  # type: ignore[arg-type]
    taus = [magprune(a - c, p, eps, rng), magprune(b - c, p, eps, rng)]
    return c + float(params["ties_scale"]) * sign_elected_mean(taus, [1 - alpha, alpha])  # type: ignore[arg-type]


def median_coefficients(gram: list[list[float]], weights: list[float], iterations: int = 5000) -> list[float]:
    """The weighted geometric median of N points as convex coefficients l (median = sum_i l_i x_i), from their
    Gram matrix gram[i][k] = x_i . x_k alone.

    Weiszfeld's step y <- sum_i (w_i / d_i) x_i / sum_i (w_i / d_i) is itself a convex combination of the points,
    so the iteration runs on N numbers (|y - x_j|^2 = l.G.l - 2 (G l)_j + G_jj) and the tensors are combined once.
    A point whose weight (with the points equal to it) exceeds the pull of the others, |sum_i w_i u_i| with u_i
    the unit vectors to them, is the median itself (Kuhn's condition), returned exactly; otherwise the iteration
    starts at the weighted mean and stops when a step moves y by less than 1e-9 of the mean distance.
    """
    n, total = len(weights), sum(weights)

    def between(i: int, k: int, j: int) -> float:  # (x_i - x_j) . (x_k - x_j)
        return gram[i][k] - gram[i][j] - gram[j][k] + gram[j][j]

    for j in range(n):
        dist = [math.sqrt(max(between(i, i, j), 0.0)) for i in range(n)]
        own = sum(w for w, d in zip(weights, dist, strict=True) if d == 0.0)
        far = [i for i in range(n) if dist[i] > 0.0 and weights[i] > 0.0]
        pull2 = sum(weights[i] * weights[k] * between(i, k, j) / (dist[i] * dist[k]) for i in far for k in far)
        if own > 0.0 and own * own > pull2:
            return [1.0 if i == j else 0.0 for i in range(n)]
    lam = [w / total for w in weights]
    for _ in range(iterations):
        g = [sum(gram[j][k] * lam[k] for k in range(n)) for j in range(n)]
        q = sum(lj * gj for lj, gj in zip(lam, g, strict=True))
        d = [math.sqrt(max(q - 2 * g[j] + gram[j][j], 0.0)) for j in range(n)]
        scale = sum(w * dj for w, dj in zip(weights, d, strict=True)) / total
        if scale == 0.0:
            break
        v = [w / max(dj, 1e-12 * scale) for w, dj in zip(weights, d, strict=True)]
        new = [vj / sum(v) for vj in v]
        step = [x - y for x, y in zip(new, lam, strict=True)]
        moved2 = sum(step[i] * gram[i][k] * step[k] for i in range(n) for k in range(n))
        lam = new
        if moved2 <= (1e-9 * scale) ** 2:
            break
    return lam


def _dot(x: Tensor, y: Tensor) -> float:
    return float(torch.sum(x * y, dtype=torch.float64))


def weighted_geometric_median(points: list[Tensor], weights: list[float]) -> Tensor:
    """The point y minimising sum_i w_i |y - x_i| (L2 over the whole tensor): `median_coefficients` from the
    points' dot products, then one combination. Pass points near the origin (differences from a base), so the
    dot products keep their precision."""
    gram = [[_dot(x, y) for y in points] for x in points]
    lam = median_coefficients(gram, weights)
    out = points[0] * lam[0]
    for li, x in zip(lam[1:], points[1:], strict=True):
        out.add_(x, alpha=li)
    return out


def geometric_median(a: Tensor, b: Tensor, c: Tensor | None, alpha: float, params: Mapping[str, object],
                     rng: torch.Generator) -> Tensor:
    """The weighted geometric median of the three models A, B, C (weights 1 - alpha, alpha, 1/2), per tensor:
    C + GM(A - C, B - C, 0). At alpha 0.5 the weights are equal, which is sd-mecha's `geometric_median(A, B, C)`.
    C is the third point on purpose: the geometric median of two points is the heavier one (either point at
    equal weights), so A - C and B - C alone would give A, B or their average. A point whose weight exceeds the
    pull of the others is the median itself, so A (B) is returned for small (large) alpha. Three dot products
    and one combination per tensor: the iterations run on the coefficients (`median_coefficients`)."""
    assert c is not None
    ta, tb = a - c, b - c
    ab = _dot(ta, tb)
    gram = [[_dot(ta, ta), ab, 0.0], [ab, _dot(tb, tb), 0.0], [0.0, 0.0, 0.0]]
    la, lb, _ = median_coefficients(gram, [1 - alpha, alpha, 0.5])
    return c + (ta.mul_(la).add_(tb, alpha=lb))


def key_generator(seed: int, key: str) -> torch.Generator:
    """The generator a random method gets for `key`: a function of (seed, key) only."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(key.encode())) % (2**63))


# -- the registry ----------------------------------------------------------------------------------------------

DENSITY = Param("ties_density", float, 0.0, 1.0, 0.2, "TIES density (kept fraction)",
                "fraction of each task vector's entries kept, by magnitude, per tensor (the paper keeps 20%)",
                low_open=True)
SCALE = Param("ties_scale", float, 0.0, 4.0, 1.0, "TIES scale", "factor on the merged task vector added to C")
DROP = Param("dare_p", float, 0.0, 0.99, 0.9, "DARE drop probability",
             "probability of dropping each delta entry, survivors rescaled by 1/(1-p) (DELLA: the mean drop rate, "
             "each survivor rescaled by its own keep probability)")
DELLA_EPS = Param("della_eps", float, -1.0, 1.0, 0.1, "DELLA window (eps)",
                  "spread of the drop probability by magnitude rank within each row: the largest entry is dropped "
                  "with probability dare_p - eps/2, the smallest with dare_p + eps/2 (clipped to [0, 1]); 0 is DARE, "
                  "negative favours small entries")


METHODS: dict[str, MethodInfo] = {m.name: m for m in (
    MethodInfo("rebasin", "Re-basin (weight matching)", False,
               "Align B to A with function-preserving permutations, then (1-alpha)*A + alpha*B.",
               fn=weighted_sum, linear=lambda a: (1 - a, a, 0.0), iterates=True, aligns=True, repairable=True),
    MethodInfo("weighted_sum", "Weighted sum", False, "(1-alpha)*A + alpha*B, no alignment.",
               fn=weighted_sum, linear=lambda a: (1 - a, a, 0.0), repairable=True),
    MethodInfo("add_difference", "Add difference", True, "A + alpha*(B - C), e.g. C = the base B was tuned from.",
               fn=add_difference, linear=lambda a: (1.0, a, -a), alpha_bounded=False),
    MethodInfo("train_difference", "Train difference", True,
               "A + 1.8*alpha*|B-A|/(|B-A|+|B-C|)*(B - C): B's change from its base C, added where A differs "
               "from B (SuperMerger / sd-mecha definition).",
               fn=train_difference, alpha_bounded=False, source="SuperMerger traindiff; sd-mecha"),
    MethodInfo("ties", "TIES", True,
               "C + scale * TIES(A - C, B - C): trim each task vector to its top density, elect signs, average "
               "the agreeing values (weights 1-alpha, alpha). C = the base both were tuned from.",
               fn=ties, params=(DENSITY, SCALE), source="Yadav et al. 2023, arXiv 2306.01708"),
    MethodInfo("dare", "DARE", True,
               "A + alpha * DARE(B - C): drop each delta entry with probability p, rescale by 1/(1-p); seeded.",
               fn=dare, params=(DROP,), alpha_bounded=False, random=True,
               source="Yu et al. 2023, arXiv 2311.03099"),
    MethodInfo("dare_ties", "DARE + TIES", True,
               "C + scale * TIES sign election over DARE(A - C), DARE(B - C) (weights 1-alpha, alpha); seeded.",
               fn=dare_ties, params=(DROP, SCALE), random=True,
               source="Yu et al. 2023 (DARE), Yadav et al. 2023 (TIES)"),
    MethodInfo("legacy", "Legacy (DunkMash tool compatible)", False,
               "What T0b1maru's re-basin_merger computes: a weighted sum, plus its re-matching of three "
               "output GroupNorm vectors. Not a real re-basin; kept to reproduce old recipes.",
               iterates=True, alignable=False, block_weights=False),
    MethodInfo("della", "DELLA", True,
               "C + scale * TIES sign election over MagPrune(A - C), MagPrune(B - C) (weights 1-alpha, alpha): "
               "DARE whose drop probability falls with each entry's magnitude rank in its row (dare_p on "
               "average, +-della_eps/2), survivors rescaled by 1/keep probability; seeded. della_eps 0 is DARE + "
               "TIES.",
               fn=della, params=(DROP, DELLA_EPS, SCALE), random=True,
               source="Deep et al. 2024, arXiv 2406.11617; mergekit della; sd-mecha della_eps"),
    MethodInfo("geometric_median", "Geometric median", True,
               "The point nearest to A, B and C in summed distance (weights 1-alpha, alpha, 1/2; equal at alpha "
               "0.5), per tensor, by Weiszfeld iterations: a robust average where C, the base, is the third vote.",
               fn=geometric_median,
               source="Weiszfeld 1937; sd-mecha geometric_median"),
)}

ALL_PARAMS: dict[str, Option] = {p.name: p for m in METHODS.values() for p in m.params}
