"""Git Re-Basin weight matching (Ainsworth et al. 2023, Algorithm 2) over an `ArchSpec`.

Find permutations pi of model B's groups maximising sum_k <A_k, pi(B)_k> over all permuted tensors. The problem is
NP-hard jointly, so coordinate ascent: visit the groups in a seeded random order; for one group, with every other
group fixed, the objective is linear in that group's permutation, so its best value is one linear assignment on

    C[i, j] = sum over the group's slots of <row i of A, row j of B with its other axes already permuted>.

A sweep that improves nothing ends the search (or `max_sweeps`). Cost matrices are accumulated in fp32 on the
chosen device; the assignment runs on the CPU in float64 (see `align/assignment.py`).
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from ..archspec import ArchSpec, Group, Structure
from ..errors import Cancelled
from .assignment import row_argmax_certificate, solve
from .cost import cost_matrix as cost_matrix  # re-exported: benchmarks and tests import it from here
from .cost import empty_cost, other_axes_permuted, unit_rows, window
from .cost_cache import CacheStats, CostCache
from .match_tensors import MatchTensors
from .partial_certificate import PROBE, PROBE_NONE, CurrentProof
from .permute import Perms, is_identity, is_legal

TensorGetter = Callable[[str], torch.Tensor]


@dataclass
class GroupReport:
    name: str
    part: str
    kind: str
    size: int
    moved: int = 0          # units whose final position differs from the identity
    gain: float = 0.0       # objective gain of the group's last accepted update
    solves: int = 0         # assignment problems solved
    certified: int = 0      # visits where row-argmax proved optimality and no solve ran
    screened: int = 0       # ... of which proved from the bf16 estimate and its error bound alone


@dataclass
class MatchResult:
    perms: Perms
    sweeps: int
    converged: bool
    groups: list[GroupReport]
    seconds: float = 0.0
    cost: CacheStats = field(default_factory=CacheStats)  # how the cost matrices were computed

    @property
    def solves(self) -> int:
        return sum(g.solves for g in self.groups)

    @property
    def certified(self) -> int:
        return sum(g.certified for g in self.groups)

    def moved_by_part(self) -> dict[str, tuple[int, int]]:
        """part -> (units moved, units in matched groups)."""
        out: dict[str, tuple[int, int]] = {}
        for g in self.groups:
            m, n = out.get(g.part, (0, 0))
            out[g.part] = (m + g.moved, n + g.size)
        return out


@dataclass
class MatchProgress:
    sweep: int
    index: int              # groups done in this sweep
    total: int              # groups per sweep
    group: str
    changed_this_sweep: int


# Rounding-error bound of a bf16 GEMM with fp32 accumulation and a bf16 result, per slot s with inner size m:
#   |out_s - exact_s| <= u |out_s| / (1 - u) + (2u + u^2 + m * 2^-24 (1 + u)^2) * sum_k |a_k b_k|,   u = 2^-8,
# and sum_k |a_k b_k| <= |a| |b| (Cauchy-Schwarz). Constants are rounded up and the total gets a 25% margin.
_BF16_OUT = 0.0040
_BF16_IN = 0.0080
_FP32_ACC = 6.1e-8
_MARGIN = 1.25


def screened_cost_matrix(spec: ArchSpec[Any], group: Group, get_a: TensorGetter, get_b: TensorGetter, perms: Perms,
                         device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A fast bf16 estimate of the cost matrix and a rigorous bound on its error (both fp32).

    bf16 GEMMs run several times faster than fp32 on CPUs with AMX / AVX512-BF16 and on GPUs. The estimate is only
    used to *certify* that row-argmax is the optimum (see `certified_argmax`); anything it cannot certify is
    recomputed exactly, so the result never depends on bf16 rounding.
    """
    n = group.size
    C = empty_cost(group, device)
    E = torch.zeros(n, n, dtype=torch.float32, device=device)
    for slot in group.slots:
        a = unit_rows(get_a(slot.key), slot.axis, slot.offset, slot.length, torch.bfloat16)
        b = other_axes_permuted(spec, slot, get_b(slot.key), perms, torch.bfloat16)
        out = (a @ b.T).float()
        window(C, slot).add_(out)
        e = window(E, slot)
        e.add_(out.abs(), alpha=_BF16_OUT)
        # Row norms of the rounded rows (accumulated in fp32, result rounded to bf16) are within a factor
        # (1 +- 2u) of the exact ones: inside the margin.
        e.addr_(a.norm(dim=1).float(), b.norm(dim=1).float(), alpha=_BF16_IN + a.shape[1] * _FP32_ACC)
    return C, E.mul_(_MARGIN)


def certified_argmax(C: torch.Tensor, E: torch.Tensor, structure: Structure) -> torch.Tensor | None:
    """Row-argmax of the true matrix, if the bound |C - true| <= E proves it and it is a legal permutation."""
    best = C.argmax(dim=1)
    rows = torch.arange(C.shape[0], device=C.device)
    lower = C[rows, best] - E[rows, best]
    upper = C + E
    upper[rows, best] = float("-inf")
    if not bool((lower > upper.max(dim=1).values).all()):
        return None
    return best if is_legal(structure, best) else None


# Bytes of cost matrices kept between visits (`align/cost_cache.py`).
CACHE_BYTES = 512 << 20

# Screened visits after which a screen that failed on most of them is switched off for the rest of the search.
_SCREEN_PROBE = 16


def bf16_is_fast(device: torch.device) -> bool:
    """bf16 GEMMs are much faster than fp32 here: CUDA, or a CPU with AMX-BF16 / AVX512-BF16."""
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def _dependents(spec: ArchSpec[Any], groups: list[Group]) -> dict[str, set[str]]:
    """group -> the matched groups whose cost matrices read its permutation (they share a tensor, other axis)."""
    names = {g.name for g in groups}
    on_key: dict[str, list[tuple[int, str]]] = {}
    for g in groups:
        for s in g.slots:
            on_key.setdefault(s.key, []).append((s.axis, g.name))
    out: dict[str, set[str]] = {g.name: set() for g in groups}
    for key, members in on_key.items():
        for axis, name in members:
            for other_axis in spec.axes[key]:
                if other_axis == axis:
                    continue
                for dep, *_ in spec.axes[key][other_axis]:
                    if dep in names:
                        # `name` reads `dep`'s permutation on the other axis, so a change of dep dirties name.
                        out[dep].add(name)
    return out


def weight_matching(spec: ArchSpec[Any], groups: Iterable[Group], get_a: TensorGetter, get_b: TensorGetter, *,
                    seed: int = 0, max_sweeps: int = 100, device: str | torch.device = "cpu",
                    init: Perms | None = None, progress: Callable[[MatchProgress], None] | None = None,
                    cancel: Callable[[], bool] | None = None, certificate: bool = True,
                    skip_unchanged: bool = True, screen: bool | None = None,
                    tolerance: float = 0.0, after_visit: Callable[[], None] | None = None,
                    keep: tuple[bool, bool] = (True, True), partial: bool = True,
                    cache_bytes: int | None = None, overlap: bool = True) -> MatchResult:
    """Coordinate-ascent weight matching of B onto A over `groups`; returns permutations for B.

    `certificate` and `skip_unchanged` are the two exact shortcuts (row-argmax optimality certificate; no revisit
    of a group whose cost matrix cannot have changed). They never change the result; turning them off gives the
    plain algorithm, which the tests compare against. `screen` (default: where bf16 is fast) first tries to certify
    row-argmax from a bf16 cost matrix with a rigorous error bound, and computes the exact fp32 matrix only when
    that fails; a group whose screen failed goes straight to fp32 afterwards. `partial` (with `certificate`) first
    tries to prove the current permutation optimal from part of the cost matrix (`align/partial_certificate.py`);
    like the other shortcuts it never changes the result.

    `tolerance` > 0 also stops once a sweep gains less than that fraction of what the first sweep gained (the
    objective changes by exactly the accepted groups' gains). 0, the default, is the paper's rule: stop only when a
    sweep improves nothing. Independent models gain most of the objective in 2-3 sweeps and then crawl for tens.

    `after_visit` is called after each visit that read the models (a proof, a screen or a cost matrix; not a skipped
    one): the caller can release memory there.
    `keep` says, for A and B, whether a tensor fetched once is kept for later visits (see `align/match_tensors.py`).
    `cache_bytes` bounds the cost matrices kept between visits and updated by the columns that moved since
    (`align/cost_cache.py`); 0 computes every matrix in full. The default keeps `CACHE_BYTES` on the CPU and none
    on other devices (there the matrices are cheap next to the assignments, and device memory is budgeted without
    them, `device_budget.py`). `overlap` solves assignments on other threads while
    the next groups' cost matrices are computed; it never changes the sequence of steps.
    """
    start = time.perf_counter()
    dev = torch.device(device)
    groups = list(groups)
    ta, tb = MatchTensors(get_a, dev, keep[0]), MatchTensors(get_b, dev, keep[1])
    perms: Perms = {g.name: torch.arange(g.size) for g in groups}
    for name, p in (init or {}).items():
        if name in perms:
            perms[name] = p.clone().cpu()
    # Only non-identity permutations are applied when building cost matrices: identity re-indexing is a copy.
    moved: Perms = {k: p for k, p in perms.items() if not is_identity(p)}
    use_screen = bf16_is_fast(dev) if screen is None else screen
    unscreenable: set[str] = set()
    screen_tries = screen_wins = 0
    use_partial = partial
    # Where a model is re-read on each visit, the proof keeps the few columns each visit needs from the read that
    # gives its statistics; where both are kept, nothing needs keeping twice.
    proof = CurrentProof(spec, ta, tb, dev, groups if not all(keep) else ())
    partial_tries = partial_wins = 0
    reports = {g.name: GroupReport(g.name, g.part, g.kind, g.size) for g in groups}
    affects = _dependents(spec, groups)
    dirty = {g.name for g in groups}
    if cache_bytes is None:
        cache_bytes = CACHE_BYTES if dev.type == "cpu" else 0
    cache = CostCache(spec, groups, cache_bytes)
    rng = random.Random(seed)
    sweeps, converged, first_gain = 0, False, 0.0
    changed, sweep_gain = 0, 0.0
    # Visits whose assignment is solved on another thread while the next visits' cost matrices are computed (scipy
    # releases the GIL). They are applied in visit order, and a visit that reads a queued group's permutation
    # waits for it, so the search makes exactly the sequential steps. While one long solve runs, the visits after
    # it that do not read its group go on computing their matrices (up to `_AHEAD_BYTES` of them held) instead of
    # leaving a core idle until it ends.
    queue: deque[_Visit] = deque()
    solver = ThreadPoolExecutor(_IN_FLIGHT, thread_name_prefix="rebasin-lap") if overlap else _Inline()
    ahead = 0  # bytes of the queued visits' matrices behind the first

    def settle() -> None:
        nonlocal changed, sweep_gain, ahead
        v = queue.popleft()
        if queue:
            ahead -= queue[0].C.numel() * queue[0].C.element_size()
        g, rows = v.group, torch.arange(v.group.size, device=dev)
        best = v.best if isinstance(v.best, torch.Tensor) else torch.from_numpy(v.best.result()).to(dev)
        new = float(v.C[rows, best].double().sum())
        # Accept only a real improvement: ties keep the current permutation, so the search cannot cycle.
        if new > v.old + 1e-7 * max(abs(v.old), 1e-12) and not torch.equal(best, v.current):
            perms[g.name] = best.cpu()
            _set_moved(moved, g.name, perms[g.name])
            reports[g.name].gain = new - float(v.C.diagonal().double().sum())
            sweep_gain += new - v.old
            changed += 1
            dirty.update(affects[g.name])
        if after_visit is not None:
            after_visit()
        if progress is not None:
            progress(MatchProgress(sweeps + 1, v.index + 1, len(order), g.name, changed))

    order: list[Group] = []
    while sweeps < max_sweeps:
        order = groups[:]
        rng.shuffle(order)
        changed, sweep_gain = 0, 0.0
        for i, g in enumerate(order):
            if cancel is not None and cancel():
                raise Cancelled()
            while any(g.name in affects[v.group.name] for v in queue):
                settle()  # this visit reads a queued group's permutation (and whether it is dirty)
            skip = skip_unchanged and g.name not in dirty
            if skip or (certificate and (use_partial or (use_screen and g.name not in unscreenable))):
                while queue:  # these paths report at once: the queued visits report first
                    settle()
            if skip:
                # Nothing this group's cost matrix reads has changed since its last visit, so its current
                # permutation is still optimal: skipping the visit is exact, not a heuristic.
                if progress is not None:
                    progress(MatchProgress(sweeps + 1, i + 1, len(order), g.name, changed))
                continue
            dirty.discard(g.name)
            rep = reports[g.name]
            current = perms[g.name].to(dev)
            rows = torch.arange(g.size, device=dev)
            if certificate and use_partial:
                # Most visits of same-base pairs find the current permutation optimal: prove that from a share of
                # the cost matrix's arithmetic; the full path below would compute the same outcome.
                proved = proof.prove(g, moved, current)
                partial_tries += 1
                partial_wins += proved
                if not proved and ((partial_tries >= PROBE and partial_wins < partial_tries // 2)
                                   or (partial_tries >= PROBE_NONE and partial_wins == 0)):
                    use_partial = False  # mostly failing (unrelated models): only speed depends on this
                if proved:
                    rep.certified += 1
                    if after_visit is not None:
                        after_visit()
                    if progress is not None:
                        progress(MatchProgress(sweeps + 1, i + 1, len(order), g.name, changed))
                    continue
            if certificate and use_screen and g.name not in unscreenable:
                C_est, E = screened_cost_matrix(spec, g, ta, tb, moved, dev)
                best = certified_argmax(C_est, E, g.structure)
                screen_tries += 1
                if best is None and screen_tries >= _SCREEN_PROBE and screen_wins < screen_tries // 2:
                    # Mostly failing (unrelated models): the fp32 matrix is needed anyway, so stop paying for
                    # the estimate. Only speed depends on this; the result never does.
                    use_screen = False
                if best is not None:
                    screen_wins += 1
                    rep.certified += 1
                    rep.screened += 1
                    if not torch.equal(best, current):
                        # Certified optimal and different, hence strictly better than the current permutation.
                        perms[g.name] = best.cpu()
                        _set_moved(moved, g.name, perms[g.name])
                        rep.gain = float((C_est[rows, best] - C_est.diagonal()).double().sum())
                        sweep_gain += float((C_est[rows, best] - C_est[rows, current]).double().sum())
                        changed += 1
                        dirty |= affects[g.name]
                    if after_visit is not None:
                        after_visit()
                    if progress is not None:
                        progress(MatchProgress(sweeps + 1, i + 1, len(order), g.name, changed))
                    continue
                unscreenable.add(g.name)
            C = cache.cost(g, ta, tb, moved, dev)
            old = float(C[rows, current].double().sum())
            best = row_argmax_certificate(C, g.structure) if certificate else None
            if queue:
                ahead += C.numel() * C.element_size()
            if best is not None:
                rep.certified += 1
                queue.append(_Visit(g, i, C, old, current, best))
            else:
                rep.solves += 1
                queue.append(_Visit(g, i, C, old, current, solver.submit(_solve, C, g.structure)))
            while len(queue) > 1 and (ahead > _AHEAD_BYTES or not overlap):
                settle()
        while queue:
            settle()
        sweeps += 1
        if changed == 0:
            converged = True
            break
        if sweeps == 1:
            first_gain = sweep_gain
        elif tolerance > 0 and sweep_gain < tolerance * first_gain:
            converged = True  # within the requested tolerance (reported as such by the caller's options)
            break
    solver.shutdown(wait=False)
    for g in groups:
        p = perms[g.name]
        reports[g.name].moved = int((p != torch.arange(g.size)).sum())
    return MatchResult(perms, sweeps, converged, list(reports.values()), time.perf_counter() - start, cache.stats)


# Assignments solved on another thread at once, at most (each holds its cost matrix and a float64 copy).
_IN_FLIGHT = 1
# Bytes of cost matrices computed ahead of a running solve, at most (queued visits behind the first; fp32 matrices,
# the float64 copy is made when its solve starts). The largest group's matrix (SD 1.5's 5120-unit feed-forward
# groups, 100 MiB) still goes ahead alone.
_AHEAD_BYTES = 128 << 20


def _solve(C: torch.Tensor, structure: Structure) -> Any:
    """`solve` on a float64 copy of C made on the solving thread, so that visits waiting for it hold no copy."""
    return solve(C.double().cpu().numpy(), structure)


@dataclass
class _Visit:
    """A visit whose outcome is applied in order: its cost matrix, the current permutation's value and the
    optimum (or the solve computing it)."""

    group: Group
    index: int
    C: torch.Tensor
    old: float
    current: torch.Tensor
    best: torch.Tensor | Future[Any]


class _Inline:
    """`overlap=False`: each assignment is solved on the spot."""

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        done: Future[Any] = Future()
        done.set_result(fn(*args))
        return done

    def shutdown(self, wait: bool = True) -> None:
        pass


def _set_moved(moved: Perms, name: str, perm: torch.Tensor) -> None:
    if is_identity(perm):
        moved.pop(name, None)
    else:
        moved[name] = perm
