"""Finding B's permutation onto a reference for one merge: weight matching, or activation matching for the UNet
and text encoder, with the merge's progress and a record of what moved in its diagnostics."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from ..align.permute import Perms, is_identity
from ..align.weight_matching import GroupReport, MatchProgress, MatchResult, TensorGetter, weight_matching
from ..archspec import ArchSpec
from ..device_budget import activations_need, budget_for, matching_keep, matching_need
from ..io.finite import Model, guard_getter
from ..io.model_input import ModelInput
from ..memory import idle_heap_trimmer
from ..options import MergeOptions
from ..progress import Reporter
from ..sd1.activation_inputs import LATENT_SIZE
from .blend import shared_window
from .diagnostics import Diagnostics
from .first_match import FirstMatch, first_match
from .stages import ACTIVATIONS_SHARE, sweep_progress


def match(spec: ArchSpec[Any], parts: tuple[str, ...], get_ref: TensorGetter, get_b: TensorGetter,
          opts: MergeOptions, device: torch.device, init: Perms | None,
          on_progress: Callable[[MatchProgress], None], ref_is_file: bool, checked: list[Model],
          report: Reporter | None = None) -> MatchResult:
    """B's permutation onto `get_ref` over the groups of `parts`, by the options' matching."""
    # Each tensor matching reads is checked once as it is fetched: a NaN would make the assignment fail.
    get_ref = guard_getter(get_ref, checked[0], opts.allow_nonfinite)
    get_b = guard_getter(get_b, checked[1], opts.allow_nonfinite)
    groups = spec.groups_in(parts)
    if opts.matching == "activations":
        return _match_activations(spec, groups, get_ref, get_b, opts, device, on_progress, report)
    # What matching keeps on its device, and where it runs when a GPU's free memory is short: device_budget.py.
    budget = budget_for(device, report)
    kept_need, visit_need = matching_need(spec, groups)
    fits = budget.fits(kept_need)

    def run(dev: torch.device) -> MatchResult:
        return weight_matching(spec, groups, get_ref, get_b, seed=opts.seed, max_sweeps=opts.max_sweeps, device=dev,
                               init=init, progress=on_progress, tolerance=opts.tolerance,
                               keep=matching_keep(dev, ref_is_file, fits),
                               after_visit=idle_heap_trimmer())

    return budget.run("weight matching", visit_need, run)


def _match_activations(spec: ArchSpec[Any], groups: list, get_ref: TensorGetter, get_b: TensorGetter,
                       opts: MergeOptions, device: torch.device, on_progress: Callable[[MatchProgress], None],
                       report: Reporter | None) -> MatchResult:
    """UNet and text-encoder groups by activation matching; VAE groups (no forward pass here, and no tensor
    shared with the other parts) by weight matching, exactly as weight matching alone would align them."""
    from ..align.activation_matching import activation_matching

    start = time.perf_counter()
    by_activations = [g for g in groups if g.part != "vae"]
    by_weights = [g for g in groups if g.part == "vae"]
    share = ACTIVATIONS_SHARE if by_weights else 1.0

    def progress(fraction: float, message: str) -> None:
        if report is not None:
            with report.part(0.0, share):
                report("matching", fraction, message)

    def vae_progress(p: MatchProgress) -> None:
        if report is None:
            on_progress(p)
            return
        with report.part(share, 1.0):
            on_progress(p)

    perms = budget_for(device, report).run(
        "activation matching", activations_need(spec, by_activations, LATENT_SIZE),
        lambda dev: activation_matching(spec, by_activations, get_ref, get_b, samples=opts.activation_samples,
                                        seed=opts.seed, device=dev, progress=progress))
    reports = [GroupReport(g.name, g.part, g.kind, g.size, moved=int((perms[g.name] != torch.arange(g.size)).sum()))
               for g in by_activations if g.name in perms]
    sweeps, converged = 0, True
    if by_weights:
        vae = budget_for(device, report).run(
            "weight matching", matching_need(spec, by_weights)[0],
            lambda dev: weight_matching(spec, by_weights, get_ref, get_b, seed=opts.seed, max_sweeps=opts.max_sweeps,
                                        device=dev, progress=vae_progress, tolerance=opts.tolerance,
                                        keep=(dev.type != "cpu",) * 2))
        perms.update(vae.perms)
        reports += vae.groups
        sweeps, converged = vae.sweeps, vae.converged
    return MatchResult(perms, sweeps, converged, reports, time.perf_counter() - start)


def align_once(spec: ArchSpec[Any], parts: tuple[str, ...], get_a: TensorGetter, get_b: TensorGetter,
               get_b_like: ModelInput, opts: MergeOptions, device: torch.device, report: Reporter,
               diag: Diagnostics, checked: list[Model], first: FirstMatch | None = None) -> Perms:
    """Re-basin alignment of B onto A for any method: one weight-matching run (shared through `first` by a sweep's
    candidates); C later gets B's permutation.

    C is normally the base B was tuned from, so it lives in B's basin: permuting it with B's permutation keeps
    B - C a true task vector, now in A's coordinates (matching C on its own would scramble that difference)."""
    result = first_match(first, lambda: match(spec, parts, shared_window(get_a, get_b_like), get_b, opts, device,
                                              None, sweep_progress(report), ref_is_file=True, checked=checked,
                                              report=report))
    diag.matched = True
    diag.match_steps = 1
    diag.sweeps.append(result.sweeps)
    diag.solves += result.solves
    diag.certified += result.certified
    diag.converged = result.converged
    record_moves(diag, result)
    return {k: p for k, p in result.perms.items() if not is_identity(p)}


def record_moves(diag: Diagnostics, result: MatchResult) -> None:
    """How many units each part moved, and the groups that moved most (by share of their units)."""
    diag.moved = {p: [m, n] for p, (m, n) in result.moved_by_part().items()}
    moved = sorted((g for g in result.groups if g.moved), key=lambda g: -g.moved / g.size)
    diag.top_groups = [(g.name, g.moved, g.size) for g in moved[:10]]
