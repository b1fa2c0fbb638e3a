"""Re-basin merging, (1-a) A + a pi(B), and its iterations form: a is stepped so that the steps telescope to a,
and B is re-aligned to the running merge at each step, warm-started from the previous permutation.

The iterations form stops re-matching as soon as a step returns the permutation it started from: from then on
that permutation stays optimal at every later step (see `iterated_rebasin`), so the remaining steps collapse
into one closed-form blend that is exactly what running them would give.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from ..align.permute import Perms, is_identity
from ..align.weight_matching import TensorGetter
from ..archspec import ArchSpec
from ..io.finite import Model
from ..io.model_input import ModelInput
from ..options import MergeOptions
from ..parts import part_of
from ..progress import Reporter
from .alignment import match, record_moves
from .blend import Blend, BlockBlend, Term, merge_equal_terms, shared_window, telescoping_schedule
from .diagnostics import Diagnostics
from .first_match import FirstMatch, first_match
from .method_blend import alpha_lookup
from .stages import sweep_progress


def iterated_rebasin(spec: ArchSpec[Any], parts: tuple[str, ...], get_a: TensorGetter, get_b: TensorGetter,
                     get_b_like: ModelInput, opts: MergeOptions, device: torch.device, report: Reporter,
                     diag: Diagnostics, checked: list[Model],
                     first: FirstMatch | None = None) -> tuple[Blend | BlockBlend, Perms]:
    """(1-a)A + a pi(B), or its iterations form; returns the final blend and the last permutation. Step 1's match
    (against A itself) comes through `first`, which a sweep's candidates share.

    Why the closed form is exact: suppose step x re-matches the running merge M against B and returns the
    permutation pi it was warm-started from, with the search converged (no group can improve). The next running
    merge is M' = (1-a) M + a pi(B). For any group, the assignment objective under M' is (1-a) times the one
    under M, which pi already maximises, plus a times <pi(B), sigma(pi(B))>, which sigma = identity maximises
    (Cauchy-Schwarz: sum_i <x_i, x_sigma(i)> <= sum_i |x_i|^2). So pi is again a fixed point, for every later
    step by induction, and the remaining steps are blends with the same pi(B): their product collapses to
    M_N = c M + (1-c) pi(B) with c = prod of (1 - a_y) over the remaining steps.
    """
    n = opts.iterations
    # One track of terms per distinct weight of B (one track without block weights); every track steps through
    # its own telescoping schedule, all with the same permutation of each step.
    alphas = _alphas_in(spec, parts, opts)
    schedules = {al: telescoping_schedule(al, n) for al in alphas}
    tracks = {al: [Term(1.0, get_a, {})] for al in alphas}
    # The closed form's proof needs every key of a group to take the same step (one alpha over the matched parts).
    # ... and weight matching's fixed point: activations are not linear in the weights, so activation matching
    # runs every step.
    uniform = len(alphas) == 1 and opts.matching == "weights"
    perms: Perms | None = None
    diag.matched = True
    for x in range(n):
        running = _tracks_blend(spec, tracks, opts, device, merge=False)
        # Each step fills its own share of the bar and is named in every message (see progress.Reporter).
        with report.part(x / n, (x + 1) / n, f"step {x + 1}/{n}" if n > 1 else ""):
            # Step 1 matches against A itself; later steps against the running merge (cached fp32 inside
            # matching). Matching compares shared windows only (an inpainting A's extra input channels have no
            # partner in B).
            compute = partial(match, spec, parts, shared_window(get_a, get_b_like) if x == 0 else
                              shared_window(running, get_b_like), get_b, opts, device, perms,
                              sweep_progress(report), ref_is_file=x == 0, checked=checked, report=report)
            result = first_match(first, compute) if x == 0 else compute()
        diag.match_steps += 1
        diag.sweeps.append(result.sweeps)
        diag.solves += result.solves
        diag.certified += result.certified
        diag.converged = diag.converged and result.converged
        moved = {k: p for k, p in result.perms.items() if not is_identity(p)}  # identity re-indexing is a copy
        unchanged = perms is not None and perms.keys() == moved.keys() and all(
            torch.equal(moved[k], perms[k]) for k in perms)
        perms = moved
        record_moves(diag, result)
        if unchanged and result.converged and uniform:
            diag.closed_form_steps = n - x
            for al, terms in tracks.items():
                c = 1.0
                for a_y in schedules[al][x:]:
                    c *= 1 - a_y
                for t in terms:
                    t.weight *= c
                terms.append(Term(1 - c, get_b, perms))
            break
        for al, terms in tracks.items():
            a_x = schedules[al][x]
            for t in terms:
                t.weight *= 1 - a_x
            terms.append(Term(a_x, get_b, perms))
    assert perms is not None
    return _tracks_blend(spec, tracks, opts, device, merge=True), perms


def _alphas_in(spec: ArchSpec[Any], parts: tuple[str, ...], opts: MergeOptions) -> list[float]:
    """The distinct weights of B over every key of the spec (just alpha without block weights). All keys, not only
    the merged parts': a group's cost can read keys of another part (the text encoder's residual stream feeds the
    UNet's cross-attention), and the running merge must have a value for each."""
    if opts.blocks is None:
        return [opts.alpha]
    return sorted({opts.alpha_of(k) for k in spec.shapes if part_of(k) != "other"})


def _tracks_blend(spec: ArchSpec[Any], tracks: dict[float, list[Term]], opts: MergeOptions, device: torch.device,
                  merge: bool) -> Blend | BlockBlend:
    def blend_for(al: float) -> Blend:
        terms = tracks[al]
        return Blend(spec, merge_equal_terms(terms) if merge else terms, device)

    if opts.blocks is None:
        return blend_for(opts.alpha)
    return BlockBlend(blend_for, alpha_lookup(opts))
