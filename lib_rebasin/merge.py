"""Running one merge: preflight of the inputs, the plan that produces every output key, and the streamed write.

Every method reduces to a *blend* (`blend.py`): a linear combination of source models, each possibly permuted,
evaluated key by key while the output is streamed to disk:

    weighted_sum     (1-a) A + a B
    add_difference   A + a (B - C)
    rebasin          (1-a) A + a pi(B),  pi = weight matching of B onto A
    rebasin, N>1     the "iterations" form: a is stepped so the steps telescope to a, and B is re-aligned to the
                     running merge at each step, warm-started from the previous permutation.

The iterations form stops re-matching as soon as a step returns the permutation it started from: from then on
that permutation stays optimal at every later step (see `_iterated_rebasin`), so the remaining steps collapse
into one closed-form blend that is exactly what running them would give.

The options live in `options.py`, progress in `progress.py`, diagnostics in `diagnostics.py` and the provenance
metadata in `provenance.py`; their public names are re-exported here for callers of `lib_rebasin.merge`.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import __version__
from .blend import Blend, Term, merge_equal_terms, shared_window, telescoping_schedule
from .checkpoint import (PRECISIONS, Checkpoint, check_output_path, memory_checkpoint, release_mapped_pages,
                         write_safetensors)
from .diagnostics import PART_NAMES, Diagnostics, accumulate, accumulate_objective
from .errors import RebasinError
from .matching import MatchProgress, MatchResult, TensorGetter, weight_matching
from .models import ModelInput, Source, check_compatible, open_model, same_file
from .options import METHODS, MergeOptions, MethodInfo
from .permute import Perms, axis_index, is_identity
from .progress import CancelCheck, ProgressCallback, ProgressEvent, Reporter
from .provenance import SPEC_VERSION, provenance_metadata, recipe_of
from .spec import PARTS, ArchSpec, part_of

__all__ = ["METHODS", "MethodInfo", "MergeOptions", "ProgressEvent", "ProgressCallback", "CancelCheck", "Reporter",
           "Diagnostics", "PART_NAMES", "MergeResult", "Prepared", "preflight", "merge_checkpoints",
           "merge_in_memory", "telescoping_schedule", "SPEC_VERSION"]

# Resident memory allowed for the inputs' memory-mapped pages (see `release_mapped_pages`). Matching revisits every
# tensor each sweep, so it keeps more of them mapped (fewer page faults); writing reads each tensor once.
MATCHING_PAGE_BUDGET = 2_500_000_000
WRITING_PAGE_BUDGET = 256_000_000


@dataclass
class MergeResult:
    output: Path
    diagnostics: Diagnostics
    metadata: dict[str, str]
    seconds: float


# -- the merge -------------------------------------------------------------------------------------------------

@dataclass
class Prepared:
    a: ModelInput
    b: ModelInput
    c: ModelInput | None
    output: Path | None
    options: MergeOptions
    overwrite: bool = False

    def close(self) -> None:
        for m in (self.a, self.b, self.c):
            if m is not None:
                m.close()


def preflight(a: Source, b: Source, output: str | os.PathLike[str] | None, options: MergeOptions,
              c: Source | None = None, overwrite: bool = False) -> Prepared:
    """Check everything that can be checked from the file headers; raise RebasinError with the reason.

    Sources are file paths or already open checkpoints (a recipe's in-memory intermediate results). `output` is
    None when the result stays in memory. Returns the opened inputs (call `.close()` when only validating).
    """
    options.validate()
    info = METHODS[options.method]
    if info.needs_c and c is None:
        raise RebasinError(f"{info.label} needs a model C.")
    if same_file(a, b):
        raise RebasinError("Model A and model B are the same file; pick two different models.")
    if c is not None and info.needs_c and same_file(b, c):
        raise RebasinError("Model B and model C are the same file, so B - C is zero; pick different models.")
    for src in (a, b, c):
        if src is not None and output is not None and Path(output).exists() and same_file(src, output):
            raise RebasinError("The output would overwrite an input model; choose another output name.")
    out = check_output_path(output, overwrite) if output is not None else None
    opened: list[ModelInput] = []
    try:
        ma = open_model(a, "A")
        opened.append(ma)
        mb = open_model(b, "B")
        opened.append(mb)
        mc = open_model(c, "C") if (c is not None and info.needs_c) else None
        if mc is not None:
            opened.append(mc)
        parts = tuple(p for p in options.parts if p in ma.parts)
        if not parts:
            raise RebasinError("Model A has none of the chosen parts.")
        check_compatible(ma, mb, parts)
        if mc is not None:
            check_compatible(ma, mc, parts)
    except BaseException:
        for m in opened:
            m.close()
        raise
    return Prepared(ma, mb, mc, out, options, overwrite)


def merge_checkpoints(a: Source, b: Source, output: str | os.PathLike[str],
                      options: MergeOptions = MergeOptions(), c: Source | None = None,
                      overwrite: bool = False, progress: ProgressCallback | None = None,
                      cancel: CancelCheck | None = None, extra_metadata: dict[str, str] | None = None,
                      metadata_hook: Callable[[Diagnostics], dict[str, str]] | None = None) -> MergeResult:
    """Run one merge and write it atomically to `output`. Raises RebasinError (incl. Cancelled); no file then.

    `metadata_hook(diagnostics)` may replace metadata entries once the merge is done (recipes store the whole
    chain's provenance there).
    """
    report = Reporter(progress, cancel)
    report.stage(0.0, 0.02)
    report("loading", 0.0, "reading checkpoint headers")
    prep = preflight(a, b, output, options, c, overwrite)
    try:
        plan = _plan(prep, report, extra_metadata or {}, metadata_hook)
        assert prep.output is not None
        out = write_safetensors(prep.output, plan.entries, plan.produce, plan.metadata(),
                                overwrite=prep.overwrite, finalize_metadata=plan.metadata)
        report("writing", 1.0, "done")
        return MergeResult(out, plan.diagnostics, plan.metadata(), plan.diagnostics.seconds)
    finally:
        prep.close()


def merge_in_memory(a: Source, b: Source, options: MergeOptions, c: Source | None = None,
                    report: "Reporter | None" = None, name: str = "merged") -> tuple[Checkpoint, Diagnostics]:
    """The same merge, kept in memory (a recipe's intermediate step): the tensors are exactly those
    `merge_checkpoints` would write, so reading that file back would give the same bytes."""
    report = report or Reporter(None, None)
    prep = preflight(a, b, None, options, c)
    try:
        plan = _plan(prep, report, {}, None)
        tensors = {key: plan.produce(key) for key, _, _ in plan.entries}
        metadata = plan.metadata()
    finally:
        prep.close()
    return memory_checkpoint(tensors, metadata, name), plan.diagnostics


@dataclass
class _Plan:
    entries: list[tuple[str, tuple[int, ...], torch.dtype]]
    produce: Callable[[str], torch.Tensor]
    metadata: Callable[[], dict[str, str]]
    diagnostics: Diagnostics


def _plan(prep: Prepared, report: Reporter, extra_metadata: dict[str, str],
          metadata_hook: Callable[[Diagnostics], dict[str, str]] | None) -> _Plan:
    """Match (if needed) and return how to produce every output key, in A's key order."""
    start = time.perf_counter()
    opts = prep.options
    A, B = prep.a, prep.b
    spec = A.spec
    parts = tuple(p for p in opts.parts if p in A.parts)
    device = torch.device(opts.device)
    diag = Diagnostics(opts.method, opts.alpha, opts.iterations, list(parts))
    get_a, get_b = A.ckpt.get, B.ckpt.get
    inputs = [m.ckpt for m in (A, B, prep.c) if m is not None]

    report.stage(0.02, 0.80 if opts.method == "rebasin" else 0.03)
    blend: Callable[[str], torch.Tensor]
    if opts.method == "rebasin":
        blend, final_perms = _iterated_rebasin(spec, parts, get_a, get_b, B, opts, device, report, diag,
                                               lambda: release_mapped_pages(inputs, MATCHING_PAGE_BUDGET))
    elif opts.method == "weighted_sum":
        blend, final_perms = Blend(spec, [Term(1 - opts.alpha, get_a, {}), Term(opts.alpha, get_b, {})], device), {}
    elif opts.method == "add_difference":
        assert prep.c is not None
        blend = Blend(spec, [Term(1.0, get_a, {}), Term(opts.alpha, get_b, {}),
                             Term(-opts.alpha, prep.c.ckpt.get, {})], device)
        final_perms = {}
    else:
        blend, final_perms = _legacy_blend(spec, get_a, get_b, opts, device, report), {}

    # Hash the inputs before writing, so the output file itself is never hashed by mistake.
    write_from = 0.85 if opts.method == "rebasin" else 0.15
    report.stage(0.80 if opts.method == "rebasin" else 0.03, write_from)
    metadata = provenance_metadata(prep, parts, extra_metadata, report)
    report.stage(write_from, 1.0)

    out_dtype = PRECISIONS[opts.precision]
    keys = A.ckpt.keys()
    # position_ids are indices even when an old merge stored them as floats: always A's, never blended.
    merged_keys = {k for k in keys if k in spec.shapes and part_of(k) in parts and not k.endswith("position_ids")
                   and A.ckpt.infos[k].dtype.is_floating_point}
    diag.copied_from_a = len(keys) - len(merged_keys)
    diag.dropped_from_b = sum(1 for k in B.ckpt.keys() if k not in A.ckpt.infos)
    diag.kept_a_extra_channels = A.config.unet_in_channels != B.config.unet_in_channels

    entries = []
    for k in keys:
        info = A.ckpt.infos[k]
        model_weight = k in spec.shapes and part_of(k) in PARTS and info.dtype.is_floating_point
        entries.append((k, info.shape, out_dtype if model_weight else info.dtype))
    dtypes = {k: d for k, _, d in entries}
    sizes = {k: max(1, math.prod(s)) for k, s, _ in entries}
    total = sum(sizes.values())
    done = 0
    measure = opts.method == "rebasin"
    objective = {p: [0.0, 0.0, 0.0, 0.0] for p in parts}

    def produce(key: str) -> torch.Tensor:
        nonlocal done
        release_mapped_pages(inputs, WRITING_PAGE_BUDGET)
        report("writing", done / total, f"writing {key}")
        done += sizes[key]
        if key not in merged_keys:
            return A.ckpt.get(key).to(dtypes[key])
        if not (measure and spec.axes.get(key)):
            return blend(key).to("cpu").to(dtypes[key])
        acc = objective[part_of(key)]
        if isinstance(blend, Blend) and len(blend.terms) == 2 and blend.terms[1].get is get_b:
            # (1-a) A + a pi(B): reuse the fp32 A and pi(B) the blend computes anyway.
            def observe(values: list[tuple[float, torch.Tensor]]) -> None:
                a, pb = values[0][1], values[1][1]
                moved = any(axis_index(spec, key, ax, final_perms) is not None for ax in spec.axes[key])
                b = get_b(key).to(pb.device, torch.float32) if moved else pb
                accumulate(acc, a, b, pb)

            return blend(key, observe).to("cpu").to(dtypes[key])
        accumulate_objective(acc, spec, key, get_a, get_b, final_perms)
        return blend(key).to("cpu").to(dtypes[key])

    def final_metadata() -> dict[str, str]:
        # The objective is measured while producing the keys; a file header is rewritten in place once known.
        # Wall time is reported to the caller but never stored, so the same inputs give the same bytes.
        diag.objective = {p: o for p, o in objective.items() if o[2] > 0} if measure else {}
        diag.seconds = time.perf_counter() - start
        stored = {k: v for k, v in diag.to_dict().items() if k != "seconds"}
        meta = {**metadata, "lib_rebasin": json.dumps({"version": __version__, "spec": SPEC_VERSION,
                                                        "recipe": recipe_of(prep, parts),
                                                        "diagnostics": stored})}
        return {**meta, **metadata_hook(diag)} if metadata_hook is not None else meta

    return _Plan(entries, produce, final_metadata, diag)

def _match(spec: ArchSpec, parts: tuple[str, ...], get_ref: TensorGetter, get_b: TensorGetter,
           opts: MergeOptions, device: torch.device, init: Perms | None,
           on_progress: Callable[[MatchProgress], None], after_visit: Callable[[], None]) -> MatchResult:
    groups = spec.groups_in(parts)
    return weight_matching(spec, groups, get_ref, get_b, seed=opts.seed, max_sweeps=opts.max_sweeps, device=device,
                           init=init, progress=on_progress, tolerance=opts.tolerance, after_visit=after_visit)


def _iterated_rebasin(spec: ArchSpec, parts: tuple[str, ...], get_a: TensorGetter, get_b: TensorGetter,
                      get_b_like: "ModelInput", opts: MergeOptions, device: torch.device, report: Reporter,
                      diag: Diagnostics, after_visit: Callable[[], None]) -> tuple[Blend, Perms]:
    """(1-a)A + a pi(B), or its iterations form; returns the final blend and the last permutation.

    Why the closed form is exact: suppose step x re-matches the running merge M against B and returns the
    permutation pi it was warm-started from, with the search converged (no group can improve). The next running
    merge is M' = (1-a) M + a pi(B). For any group, the assignment objective under M' is (1-a) times the one
    under M, which pi already maximises, plus a times <pi(B), sigma(pi(B))>, which sigma = identity maximises
    (Cauchy-Schwarz: sum_i <x_i, x_sigma(i)> <= sum_i |x_i|^2). So pi is again a fixed point, for every later
    step by induction, and the remaining steps are blends with the same pi(B): their product collapses to
    M_N = c M + (1-c) pi(B) with c = prod of (1 - a_y) over the remaining steps.
    """
    steps = telescoping_schedule(opts.alpha, opts.iterations)
    terms = [Term(1.0, get_a, {})]
    perms: Perms | None = None
    diag.matched = True
    n = len(steps)
    for x, a_x in enumerate(steps):
        running = Blend(spec, terms, device)
        label = f"step {x + 1}/{n}, " if n > 1 else ""

        def on_progress(p: MatchProgress, x: int = x, label: str = label) -> None:
            frac_sweep = 1 - 1 / (p.sweep + p.index / p.total)
            report("matching", (x + frac_sweep) / n if n > 1 else frac_sweep,
                   f"matching: {label}sweep {p.sweep}, group {p.index}/{p.total} {p.group}")

        # Step 1 matches against A itself; later steps against the running merge (cached fp32 inside matching).
        # Matching compares shared windows only (an inpainting A's extra input channels have no partner in B).
        result = _match(spec, parts, shared_window(get_a, get_b_like) if x == 0 else
                        shared_window(running, get_b_like), get_b, opts, device, perms, on_progress, after_visit)
        diag.match_steps += 1
        diag.sweeps.append(result.sweeps)
        diag.solves += result.solves
        diag.certified += result.certified
        diag.converged = diag.converged and result.converged
        moved = {k: p for k, p in result.perms.items() if not is_identity(p)}  # identity re-indexing is a copy
        unchanged = perms is not None and perms.keys() == moved.keys() and all(
            torch.equal(moved[k], perms[k]) for k in perms)
        perms = moved
        _record_moves(diag, result)
        if unchanged and result.converged:
            c = 1.0
            for a_y in steps[x:]:
                c *= 1 - a_y
            diag.closed_form_steps = n - x
            for t in terms:
                t.weight *= c
            terms.append(Term(1 - c, get_b, perms))
            break
        for t in terms:
            t.weight *= 1 - a_x
        terms.append(Term(a_x, get_b, perms))
    assert perms is not None
    return Blend(spec, merge_equal_terms(terms), device), perms

def _record_moves(diag: Diagnostics, result: MatchResult) -> None:
    diag.moved = {p: [m, n] for p, (m, n) in result.moved_by_part().items()}
    moved = sorted((g for g in result.groups if g.moved), key=lambda g: -g.moved / g.size)
    diag.top_groups = [(g.name, g.moved, g.size) for g in moved[:10]]


def _legacy_blend(spec: ArchSpec, get_a: TensorGetter, get_b: TensorGetter, opts: MergeOptions,
                  device: torch.device, report: Reporter) -> Callable[[str], torch.Tensor]:
    """T0b1maru/re-basin_merger's result (see legacy.py): a weighted sum, except six GroupNorm vectors that the
    tool re-matches every iteration; those are iterated exactly (they are tiny), everything else is one blend."""
    from .legacy import SPECIAL_KEYS, legacy_special_tensors

    special = legacy_special_tensors(
        get_a, get_b, opts.alpha, opts.iterations,
        on_iteration=lambda done, total: report("matching", done / total,
                                                f"legacy: iteration {done}/{total} (three output GroupNorms)"))
    weighted = Blend(spec, [Term(1 - opts.alpha, get_a, {}), Term(opts.alpha, get_b, {})], device)

    def value(key: str) -> torch.Tensor:
        return special[key] if key in SPECIAL_KEYS else weighted(key)

    return value

