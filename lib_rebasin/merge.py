"""Merging checkpoints: the methods, the one call that runs a merge, and its diagnostics.

Every method reduces to a *blend*: a linear combination of source models, each possibly permuted,
evaluated key by key while the output is streamed to disk:

    weighted_sum     (1-a) A + a B
    add_difference   A + a (B - C)
    rebasin          (1-a) A + a pi(B),  pi = weight matching of B onto A
    rebasin, N>1     the "iterations" form: a is stepped so the steps telescope to a, and B is re-aligned to the
                     running merge at each step, warm-started from the previous permutation.

The iterations form stops re-matching as soon as a step returns the permutation it started from: from then on
that permutation stays optimal at every later step (see `_iterated_rebasin`), so the remaining steps collapse
into one closed-form blend that is exactly what running them would give.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from . import __version__
from .checkpoint import (PRECISIONS, Checkpoint, check_output_path, memory_checkpoint, release_mapped_pages,
                         write_safetensors)
from .errors import Cancelled, RebasinError
from .matching import MatchProgress, MatchResult, TensorGetter, weight_matching
from .models import ModelInput, Source, check_compatible, legacy_hash, merge_history, open_model, same_file
from .permute import Perms, axis_index, is_identity, permute_tensor
from .spec import PARTS, ArchSpec, part_of

SPEC_VERSION = "sd1-walk-1"
# Resident memory allowed for the inputs' memory-mapped pages (see `release_mapped_pages`). Matching revisits every
# tensor each sweep, so it keeps more of them mapped (fewer page faults); writing reads each tensor once.
MATCHING_PAGE_BUDGET = 2_500_000_000
WRITING_PAGE_BUDGET = 256_000_000


# -- options, methods ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MethodInfo:
    name: str
    label: str
    needs_c: bool
    help: str


METHODS: dict[str, MethodInfo] = {m.name: m for m in (
    MethodInfo("rebasin", "Re-basin (weight matching)", False,
               "Align B to A with function-preserving permutations, then (1-alpha)*A + alpha*B."),
    MethodInfo("weighted_sum", "Weighted sum", False, "(1-alpha)*A + alpha*B, no alignment."),
    MethodInfo("add_difference", "Add difference", True, "A + alpha*(B - C), e.g. C = the base B was tuned from."),
    MethodInfo("legacy", "Legacy (DunkMash tool compatible)", False,
               "What T0b1maru's re-basin_merger computes: a weighted sum, plus its re-matching of three "
               "output GroupNorm vectors. Not a real re-basin; kept to reproduce old recipes."),
)}


@dataclass(frozen=True)
class MergeOptions:
    method: str = "rebasin"
    alpha: float = 0.5
    iterations: int = 1
    parts: tuple[str, ...] = PARTS
    device: str = "cpu"
    precision: str = "fp16"
    seed: int = 0
    max_sweeps: int = 100
    # Stop matching when a sweep gains < tolerance x the first sweep's gain; 0 is the paper's rule (until a sweep
    # improves nothing). Measured on full-size independent models: 1 % stops after 3 sweeps in 155 s with 99.8 %
    # of the converged objective gain; the paper's rule took 73 sweeps and 1,503 s (benchmarks/results.md).
    tolerance: float = 0.01

    def validate(self) -> None:
        if self.method not in METHODS:
            raise RebasinError(f"Unknown method '{self.method}'; choose one of {', '.join(METHODS)}.")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha)):
            raise RebasinError("alpha must be a number.")
        if not 0.0 <= self.alpha <= 1.0 and self.method != "add_difference":
            raise RebasinError(f"alpha must be between 0 and 1 for {self.method}, got {self.alpha}.")
        if not 1 <= int(self.iterations) <= 10_000:
            raise RebasinError(f"iterations must be between 1 and 10000, got {self.iterations}.")
        bad = [p for p in self.parts if p not in PARTS]
        if bad or not self.parts:
            raise RebasinError(f"parts must be a non-empty subset of {', '.join(PARTS)}; got {list(self.parts)}.")
        if self.precision not in PRECISIONS:
            raise RebasinError(f"precision must be one of {', '.join(PRECISIONS)}, got '{self.precision}'.")
        if self.max_sweeps < 1:
            raise RebasinError("max_sweeps must be at least 1.")
        if not 0.0 <= self.tolerance < 1.0:
            raise RebasinError(f"tolerance must be in [0, 1), got {self.tolerance}.")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise RebasinError("device 'cuda' was chosen but no CUDA GPU is available; use 'cpu'.")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise RebasinError(f"device must be 'cpu' or 'cuda', got '{self.device}'.")


# -- progress --------------------------------------------------------------------------------------------------

@dataclass
class ProgressEvent:
    fraction: float          # 0..1 for the whole merge
    stage: str               # "loading" | "matching" | "writing" | "hashing"
    message: str
    eta_s: float | None = None


ProgressCallback = Callable[[ProgressEvent], None]
CancelCheck = Callable[[], bool]


class _Reporter:
    """Maps stage-local progress onto one overall fraction, and checks the cancel flag."""

    def __init__(self, progress: ProgressCallback | None, cancel: CancelCheck | None) -> None:
        self.progress = progress
        self.cancel = cancel
        self.stage_start = time.perf_counter()
        self.span = (0.0, 1.0)

    def stage(self, lo: float, hi: float) -> None:
        self.span = (lo, hi)
        self.stage_start = time.perf_counter()

    def check(self) -> None:
        if self.cancel is not None and self.cancel():
            raise Cancelled()

    def __call__(self, stage: str, local: float, message: str) -> None:
        self.check()
        if self.progress is None:
            return
        lo, hi = self.span
        elapsed = time.perf_counter() - self.stage_start
        eta = elapsed * (1 - local) / local if local > 0.02 else None
        self.progress(ProgressEvent(lo + (hi - lo) * min(max(local, 0.0), 1.0), stage, message, eta))


# -- blends ----------------------------------------------------------------------------------------------------

@dataclass
class Term:
    weight: float
    get: TensorGetter
    perms: Perms


class Blend:
    """A lazily evaluated linear combination sum_i w_i * perm_i(model_i), in fp32, key by key."""

    def __init__(self, spec: ArchSpec, terms: list[Term], device: torch.device) -> None:
        self.spec, self.terms, self.device = spec, terms, device

    def __call__(self, key: str,
                 observe: Callable[[list[tuple[float, torch.Tensor]]], None] | None = None) -> torch.Tensor:
        """The blended fp32 value of `key`; `observe` sees the (weight, permuted fp32 source) terms first."""
        values = [(t.weight, permute_tensor(self.spec, key, t.get(key).to(self.device, torch.float32), t.perms))
                  for t in self.terms]
        if observe is not None:
            observe(values)
        shape = values[0][1].shape
        if all(v.shape == shape for _, v in values):
            out = torch.zeros(shape, dtype=torch.float32, device=self.device)
            for w, v in values:
                out.add_(v, alpha=w)
            return out
        # A wider first model (inpainting A, plain B): blend the shared window, keep A's extra channels.
        common = tuple(slice(0, min(v.shape[d] for _, v in values)) for d in range(len(shape)))
        out = values[0][1].clone()
        out[common] = 0
        for w, v in values:
            out[common] += w * v[common]
        return out


def telescoping_schedule(alpha: float, steps: int) -> list[float]:
    """Per-step weights a_x with prod(1 - a_x) = 1 - alpha: after step x, B's total weight is alpha*x/steps."""
    out = []
    for x in range(1, steps + 1):
        before = 1 - alpha * (x - 1) / steps
        after = 1 - alpha * x / steps
        out.append(1 - after / before if before > 0 else 1.0)
    return out


# -- diagnostics -----------------------------------------------------------------------------------------------

PART_NAMES = {"unet": "UNet", "te": "text encoder", "vae": "VAE"}


@dataclass
class Diagnostics:
    method: str
    alpha: float
    iterations: int
    parts: list[str]
    matched: bool = False
    sweeps: list[int] = field(default_factory=list)         # per matching run
    converged: bool = True
    solves: int = 0
    certified: int = 0
    match_steps: int = 0                                     # matching runs actually performed
    closed_form_steps: int = 0                               # iteration steps collapsed into the closed form
    moved: dict[str, list[int]] = field(default_factory=dict)  # part -> [units moved, units]
    objective: dict[str, list[float]] = field(default_factory=dict)  # part -> [<A,B>, <A,pi B>, |A|^2, |B|^2]
    top_groups: list[tuple[str, int, int]] = field(default_factory=list)  # (group, moved, size)
    copied_from_a: int = 0
    dropped_from_b: int = 0
    kept_a_extra_channels: bool = False
    seconds: float = 0.0

    def cosine(self, part: str) -> tuple[float, float] | None:
        o = self.objective.get(part)
        if not o or o[2] <= 0 or o[3] <= 0:
            return None
        norm = math.sqrt(o[2] * o[3])
        return o[0] / norm, o[1] / norm

    def summary_lines(self) -> list[str]:
        iterated = self.method in ("rebasin", "legacy") and self.iterations > 1
        lines = [f"Method: {METHODS[self.method].label}, alpha {self.alpha:g}"
                 + (f", {self.iterations} iterations" if iterated else "")
                 + f"; parts: {', '.join(PART_NAMES[p] for p in self.parts)}."]
        if self.matched:
            total_moved = sum(m for m, _ in self.moved.values())
            for part, (m, n) in self.moved.items():
                cos = self.cosine(part)
                gain = ""
                if cos is not None:
                    o = self.objective[part]
                    rel = (o[1] - o[0]) / abs(o[0]) * 100 if o[0] else float("inf")
                    gain = (f"; similarity to A {cos[0]:.4f} -> {cos[1]:.4f} "
                            f"(objective {'+' if o[1] >= o[0] else ''}{rel:.2f}%)")
                lines.append(f"{PART_NAMES[part]}: {m:,} of {n:,} units moved ({100 * m / max(n, 1):.1f}%){gain}.")
            lines.append(f"Weight matching: {sum(self.sweeps)} sweeps over {self.match_steps} run(s), "
                         f"{self.solves:,} assignment solves, {self.certified:,} skipped as provably optimal"
                         + ("" if self.converged else "; stopped at the sweep limit before converging") + ".")
            if self.closed_form_steps:
                lines.append(f"{self.closed_form_steps} of {self.iterations} iteration steps kept the same "
                             "permutation and were computed in closed form (exactly what running them gives).")
            if total_moved == 0:
                lines.append("B already lines up with A (every permutation is the identity): these models share "
                             "a basin, so this re-basin merge equals a plain weighted sum. That is expected for "
                             "fine-tunes of the same base.")
        if self.method == "legacy":
            lines.append("Legacy mode reproduces T0b1maru's re-basin_merger: every key is the weighted sum, except the "
                         "six UNet/VAE output GroupNorm vectors, which were re-matched and blended at each of the "
                         f"{self.iterations} iterations. It is not a function-preserving re-basin; use the "
                         "re-basin method for that.")
        if self.copied_from_a:
            lines.append(f"{self.copied_from_a} keys outside the merged parts or unknown to the spec were copied "
                         "from A unchanged.")
        if self.dropped_from_b:
            lines.append(f"{self.dropped_from_b} keys only present in B were not carried over.")
        if self.kept_a_extra_channels:
            lines.append("A's extra UNet input channels (inpainting / instruct-pix2pix) were kept from A.")
        lines.append(f"Finished in {self.seconds:.1f} s.")
        return lines

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


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
    report = _Reporter(progress, cancel)
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
                    report: "_Reporter | None" = None, name: str = "merged") -> tuple[Checkpoint, Diagnostics]:
    """The same merge, kept in memory (a recipe's intermediate step): the tensors are exactly those
    `merge_checkpoints` would write, so reading that file back would give the same bytes."""
    report = report or _Reporter(None, None)
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


def _plan(prep: Prepared, report: _Reporter, extra_metadata: dict[str, str],
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
    metadata = _metadata(prep, parts, extra_metadata, report)
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
                _accumulate(acc, a, b, pb)

            return blend(key, observe).to("cpu").to(dtypes[key])
        _accumulate_objective(acc, spec, key, get_a, get_b, final_perms)
        return blend(key).to("cpu").to(dtypes[key])

    def final_metadata() -> dict[str, str]:
        # The objective is measured while producing the keys; a file header is rewritten in place once known.
        # Wall time is reported to the caller but never stored, so the same inputs give the same bytes.
        diag.objective = {p: o for p, o in objective.items() if o[2] > 0} if measure else {}
        diag.seconds = time.perf_counter() - start
        stored = {k: v for k, v in diag.to_dict().items() if k != "seconds"}
        meta = {**metadata, "lib_rebasin": json.dumps({"version": __version__, "spec": SPEC_VERSION,
                                                        "recipe": _recipe(prep, parts),
                                                        "diagnostics": stored})}
        return {**meta, **metadata_hook(diag)} if metadata_hook is not None else meta

    return _Plan(entries, produce, final_metadata, diag)


def _shared_window(get: TensorGetter, like: ModelInput) -> TensorGetter:
    """`get`, narrowed to `like`'s shapes where they differ (A's wider inpainting conv_in vs a plain B)."""
    infos = like.ckpt.infos

    def narrowed(key: str) -> torch.Tensor:
        t = get(key)
        shape = infos[key].shape if key in infos else t.shape
        if tuple(t.shape) != tuple(shape):
            t = t[tuple(slice(0, n) for n in shape)]
        return t

    return narrowed


def _accumulate_objective(acc: list[float], spec: ArchSpec, key: str, get_a: TensorGetter, get_b: TensorGetter,
                          perms: Perms) -> None:
    """Add <A,B>, <A,pi(B)>, |A|^2, |B|^2 of one key (fp32 dot products, float64 running sums)."""
    a = get_a(key).float()
    b = get_b(key).float()
    _accumulate(acc, a, b, permute_tensor(spec, key, b, perms))


def _accumulate(acc: list[float], a: torch.Tensor, b: torch.Tensor, pb: torch.Tensor) -> None:
    if a.shape != b.shape:
        return  # an inpainting A's wider conv_in has no counterpart in B
    unpermuted = pb is b
    a, b, pb = a.reshape(-1), b.reshape(-1), pb.reshape(-1)
    ab = float(torch.dot(a, b))
    acc[0] += ab
    acc[1] += ab if unpermuted else float(torch.dot(a, pb))
    acc[2] += float(torch.dot(a, a))
    acc[3] += float(torch.dot(b, b))


def _match(spec: ArchSpec, parts: tuple[str, ...], get_ref: TensorGetter, get_b: TensorGetter,
           opts: MergeOptions, device: torch.device, init: Perms | None,
           on_progress: Callable[[MatchProgress], None], after_visit: Callable[[], None]) -> MatchResult:
    groups = spec.groups_in(parts)
    return weight_matching(spec, groups, get_ref, get_b, seed=opts.seed, max_sweeps=opts.max_sweeps, device=device,
                           init=init, progress=on_progress, tolerance=opts.tolerance, after_visit=after_visit)


def _iterated_rebasin(spec: ArchSpec, parts: tuple[str, ...], get_a: TensorGetter, get_b: TensorGetter,
                      get_b_like: "ModelInput", opts: MergeOptions, device: torch.device, report: _Reporter,
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
        result = _match(spec, parts, _shared_window(get_a, get_b_like) if x == 0 else
                        _shared_window(running, get_b_like), get_b, opts, device, perms, on_progress, after_visit)
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
    return Blend(spec, _merge_equal_terms(terms), device), perms


def _merge_equal_terms(terms: list[Term]) -> list[Term]:
    """Fold terms that read the same source with the same permutation (fewer passes when writing)."""
    out: list[Term] = []
    for t in terms:
        for o in out:
            if o.get == t.get and o.perms.keys() == t.perms.keys() and all(
                    torch.equal(o.perms[k], t.perms[k]) for k in o.perms):
                o.weight += t.weight
                break
        else:
            out.append(Term(t.weight, t.get, dict(t.perms)))
    return out


def _record_moves(diag: Diagnostics, result: MatchResult) -> None:
    diag.moved = {p: [m, n] for p, (m, n) in result.moved_by_part().items()}
    moved = sorted((g for g in result.groups if g.moved), key=lambda g: -g.moved / g.size)
    diag.top_groups = [(g.name, g.moved, g.size) for g in moved[:10]]


def _legacy_blend(spec: ArchSpec, get_a: TensorGetter, get_b: TensorGetter, opts: MergeOptions,
                  device: torch.device, report: _Reporter) -> Callable[[str], torch.Tensor]:
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


# -- metadata --------------------------------------------------------------------------------------------------

def _recipe(prep: Prepared, parts: tuple[str, ...]) -> dict[str, object]:
    o = prep.options
    return {"method": o.method, "alpha": o.alpha, "iterations": o.iterations, "parts": list(parts),
            "device": o.device, "precision": o.precision, "seed": o.seed, "max_sweeps": o.max_sweeps,
            "tolerance": o.tolerance,
            "models": {m.label: m.path.name for m in (prep.a, prep.b, prep.c) if m is not None}}


def _diag_header(diag: Diagnostics) -> dict[str, object]:
    d = diag.to_dict()
    d.pop("objective", None)  # measured while writing; reported by the caller
    return d


def _metadata(prep: Prepared, parts: tuple[str, ...], extra: dict[str, str], report: _Reporter) -> dict[str, str]:
    models = [m for m in (prep.a, prep.b, prep.c) if m is not None]
    hashes: dict[str, str | None] = {}
    for i, m in enumerate(models):
        report("hashing", i / len(models), f"hashing model {m.label} ({m.path.name})")
        hashes[m.label] = m.sha256()
    o = prep.options
    recipe = {"type": "lib_rebasin", "version": __version__, "spec": SPEC_VERSION,
              "primary_model_hash": hashes["A"], "secondary_model_hash": hashes["B"],
              "tertiary_model_hash": hashes.get("C"), "interp_method": o.method, "multiplier": o.alpha,
              "iterations": o.iterations, "parts": list(parts), "precision": o.precision,
              "save_as_half": o.precision == "fp16", "seed": o.seed, "max_sweeps": o.max_sweeps,
              "tolerance": o.tolerance,
              "device": o.device, "is_inpainting": prep.a.config.unet_in_channels == 9,
              "is_instruct_pix2pix": prep.a.config.unet_in_channels == 8}
    merge_models: dict[str, object] = {}
    for m in models:
        own = m.ckpt.metadata.get("sd_merge_recipe")
        try:
            own_recipe = json.loads(own) if own else None
        except json.JSONDecodeError:
            own_recipe = None
        if hashes[m.label] is None:
            continue  # an in-memory intermediate: the recipe that made it is recorded by the caller
        merge_models[hashes[m.label]] = {"name": m.path.stem, "legacy_hash": legacy_hash(m.path),
                                         "sd_merge_recipe": own_recipe}
        merge_models.update(merge_history(m))
    meta = {"format": "pt", "sd_merge_recipe": json.dumps(recipe), "sd_merge_models": json.dumps(merge_models)}
    meta.update(extra)
    return meta
