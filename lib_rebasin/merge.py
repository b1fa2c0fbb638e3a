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
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import __version__
from .arguments import check_arguments
from .blend import (Blend, BlockBlend, KeyFunctionBlend, Term, merge_equal_terms, shared_window,
                    telescoping_schedule)
from .checkpoint import (FULL_DISK_ERRNOS, PRECISIONS, Checkpoint, check_free_space, check_input_path,
                         check_output_path, format_bytes, memory_checkpoint, output_bytes, write_safetensors)
from .compute import with_merge_compute
from .diagnostics import PART_NAMES, Diagnostics, accumulate, accumulate_objective, stored_diagnostics
from .errors import InputChangedError, OutputError, RebasinError
from .finite import Model, OutputGuard, guard_getter
from .matching import GroupReport, MatchProgress, MatchResult, TensorGetter, weight_matching
from .models import ModelInput, Source, check_compatible, open_model, same_file
from .options import METHODS, MergeOptions, MethodInfo
from .permute import Perms, axis_index, is_identity, permute_tensor
from .progress import CancelCheck, ProgressCallback, ProgressEvent, Reporter
from .provenance import SPEC_VERSION, hash_progress, provenance_metadata, recipe_of
from .repair import check_supported as repair_supported, corrections, fold_bias, fold_weight
from .spec import PARTS, ArchSpec, part_of
from .vae_bake import BakedVAE  # noqa: F401  (type of _plan's argument)

__all__ = ["METHODS", "MethodInfo", "MergeOptions", "ProgressEvent", "ProgressCallback", "CancelCheck", "Reporter",
           "Diagnostics", "PART_NAMES", "MergeResult", "Prepared", "preflight", "merge_checkpoints",
           "merge_in_memory", "telescoping_schedule", "SPEC_VERSION"]

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

    def verify_unchanged(self) -> None:
        for m in (self.a, self.b, self.c):
            if m is not None:
                m.ckpt.verify_unchanged()

    def changed_error(self, e: InputChangedError) -> InputChangedError:
        """The error naming the model slot whose file changed, in one line."""
        for m in (self.a, self.b, self.c):
            if m is not None and m.ckpt.source is not None and m.ckpt.source.path == e.path:
                return InputChangedError(e.path, f"Model {m.label} ({m.path.name}) changed while it was being "
                                                 f"read; nothing was written.")
        return e


def preflight(a: Source, b: Source, output: str | os.PathLike[str] | None, options: MergeOptions,
              c: Source | None = None, overwrite: bool = False) -> Prepared:
    """Check everything that can be checked from the file headers; raise RebasinError with the reason.

    Sources are file paths or already open checkpoints (a recipe's in-memory intermediate results). `output` is
    None when the result stays in memory. Returns the opened inputs (call `.close()` when only validating).
    """
    check_arguments("preflight", ("output",), a=a, b=b, output=output, options=options, c=c, overwrite=overwrite)
    options.validate()
    info = METHODS[options.method]
    if info.needs_c and c is None:
        raise RebasinError(f"{info.label} needs a model C.")
    for src in (a, b, c):  # a missing file, a link loop or a NUL byte: say so before comparing paths
        if src is not None and not isinstance(src, Checkpoint):
            check_input_path(src)
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
        if options.matching == "activations":
            from .activation_matching import check_supported

            check_supported(ma.config, mb.config)
        if options.repair:
            if "unet" not in parts:
                raise RebasinError("REPAIR corrects UNet layers; model A has no UNet.")
            repair_supported(ma.config, mb.config)
        if mc is not None:
            check_compatible(ma, mc, parts)
        if out is not None:  # before any matching: minutes of work must not end in a full disk
            check_free_space(out, output_bytes(output_entries(ma, PRECISIONS[options.precision])))
    except BaseException:
        for m in opened:
            m.close()
        raise
    return Prepared(ma, mb, mc, out, options, overwrite)


@with_merge_compute
def merge_checkpoints(a: Source, b: Source, output: str | os.PathLike[str],
                      options: MergeOptions = MergeOptions(), c: Source | None = None,
                      overwrite: bool = False, progress: ProgressCallback | None = None,
                      cancel: CancelCheck | None = None, extra_metadata: dict[str, str] | None = None,
                      metadata_hook: Callable[[Diagnostics], dict[str, str]] | None = None,
                      bake_vae: "str | os.PathLike[str] | Checkpoint | None" = None,
                      on_commit: Callable[[Path], None] | None = None) -> MergeResult:
    """Run one merge and write it atomically to `output`. Raises RebasinError (incl. Cancelled); no file then.

    `metadata_hook(diagnostics)` may replace metadata entries once the merge is done (recipes store the whole
    chain's provenance there). `bake_vae` is a VAE file (or a checkpoint; a path, or a Checkpoint the caller
    opened and closes) whose VAE replaces the output's (vae_bake.py), checked before any work.

    The commit is the one point that decides how a cancel ends: once every byte is written and checked, a last
    cancel check runs, then `on_commit(output)` (it may raise Cancelled: nothing is written then); from its return
    on the file is put in place and the merge has succeeded, so no cancel check raises any more. Only an error
    of the system itself (a full disk at the flush, a name that appeared meanwhile) can still stop it, and then
    no file has the output's name.
    """
    check_arguments("merge_checkpoints", a=a, b=b, output=output, options=options, c=c, overwrite=overwrite,
                    progress=progress, cancel=cancel, extra_metadata=extra_metadata, metadata_hook=metadata_hook,
                    bake_vae=bake_vae)
    report = Reporter(progress, cancel)
    report.stage(0.0, 0.02)
    report("loading", 0.0, "reading checkpoint headers")
    prep = preflight(a, b, output, options, c, overwrite)
    baked = None
    try:
        if bake_vae is not None:
            from .vae_bake import open_vae

            baked = open_vae(bake_vae, prep.a.spec)
        plan = _plan(prep, report, extra_metadata or {}, metadata_hook, baked)
        assert prep.output is not None
        output = prep.output

        written: dict[str, str] = {}

        def final_metadata() -> dict[str, str]:
            # After the last tensor was read and before the file is put in place: the recorded hashes are of
            # the bytes merged only if no input changed since it was opened. Measured once: nothing that can
            # fail (an input changed since, a cancel) runs after the commit.
            prep.verify_unchanged()
            written.update(plan.metadata())
            _commit(report, on_commit, output)
            return written

        try:
            out = write_safetensors(prep.output, plan.entries, plan.produce, plan.metadata(),
                                    overwrite=prep.overwrite, finalize_metadata=final_metadata)
        except OSError as e:
            if e.errno not in FULL_DISK_ERRNOS:
                raise
            raise _full_disk(prep.output, e) from None
        report("writing", 1.0, "done")
        return MergeResult(out, plan.diagnostics, written, plan.diagnostics.seconds)
    except InputChangedError as e:
        raise prep.changed_error(e) from None
    finally:
        prep.close()
        if baked is not None:
            baked.close()


def _commit(report: Reporter, on_commit: Callable[[Path], None] | None, output: Path) -> None:
    """The last moment a cancel leaves no file; after it the output is put in place and the merge has succeeded."""
    report.check()
    if on_commit is not None:
        on_commit(output)
    report.committed = True


@with_merge_compute
def merge_in_memory(a: Source, b: Source, options: MergeOptions, c: Source | None = None,
                    report: "Reporter | None" = None, name: str = "merged") -> tuple[Checkpoint, Diagnostics]:
    """The same merge, kept in memory (a recipe's intermediate step): the tensors are exactly those
    `merge_checkpoints` would write, so reading that file back would give the same bytes."""
    check_arguments("merge_in_memory", a=a, b=b, options=options, c=c, report=report, name=name)
    report = report or Reporter(None, None)
    prep = preflight(a, b, None, options, c)
    try:
        plan = _plan(prep, report, {}, None)
        tensors = {key: plan.produce(key) for key, _, _ in plan.entries}
        prep.verify_unchanged()
        metadata = plan.metadata()
    except InputChangedError as e:
        raise prep.changed_error(e) from None
    finally:
        prep.close()
    return memory_checkpoint(tensors, metadata, name), plan.diagnostics


def _full_disk(output: Path, e: OSError) -> OutputError:
    folder = output.parent.resolve()
    try:
        free = f", {format_bytes(shutil.disk_usage(folder).free)} free"
    except OSError:
        free = ""
    return OutputError(f"Writing {output.name} failed: {e.strerror} in {folder}{free}; nothing was written. Free "
                       "some space or choose another folder.")


def output_entries(A: ModelInput, out_dtype: torch.dtype) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """The output's keys, shapes and dtypes, in A's order: model weights at the output precision, the rest as
    stored in A."""
    spec = A.spec
    entries = []
    for k in A.ckpt.keys():
        info = A.ckpt.infos[k]
        model_weight = k in spec.shapes and part_of(k) in PARTS and info.dtype.is_floating_point
        entries.append((k, info.shape, out_dtype if model_weight else info.dtype))
    return entries


@dataclass
class _Plan:
    entries: list[tuple[str, tuple[int, ...], torch.dtype]]
    produce: Callable[[str], torch.Tensor]
    metadata: Callable[[], dict[str, str]]
    diagnostics: Diagnostics


def _plan(prep: Prepared, report: Reporter, extra_metadata: dict[str, str],
          metadata_hook: Callable[[Diagnostics], dict[str, str]] | None, baked: "BakedVAE | None" = None) -> _Plan:
    """Match (if needed) and return how to produce every output key, in A's key order."""
    start = time.perf_counter()
    opts = prep.options
    A, B = prep.a, prep.b
    spec = A.spec
    parts = tuple(p for p in opts.parts if p in A.parts)
    device = torch.device(opts.device)
    diag = Diagnostics(opts.method, opts.alpha, opts.iterations, list(parts),
                       blocks=list(opts.blocks) if opts.blocks is not None else None,
                       blocks_preset=opts.blocks_preset, aligned=opts.align,
                       params={**opts.method_params(), **({"seed": opts.seed} if METHODS[opts.method].random else {})},
                       matching=opts.matching,
                       activation_samples=opts.activation_samples if opts.matching == "activations" else 0)
    get_a, get_b = A.ckpt.get, B.ckpt.get
    checked = [Model(m.label, m.path.name, m.ckpt.get, m.ckpt.keys()) for m in (A, B, prep.c) if m is not None]

    report.stage(0.02, 0.80 if opts.aligned else 0.03)
    blend: Callable[[str], torch.Tensor]
    if opts.method == "rebasin":
        blend, final_perms = _iterated_rebasin(spec, parts, get_a, get_b, B, opts, device, report, diag,
                                               checked[:2])
    elif opts.method == "legacy":
        blend, final_perms = _legacy_blend(spec, get_a, get_b, opts, device, report, checked[:2]), {}
    else:
        final_perms = _align_once(spec, parts, get_a, get_b, B, opts, device, report, diag,
                                  checked[:2]) if opts.align else {}
        blend = _method_blend(spec, prep, opts, final_perms, device)

    # position_ids are indices even when an old merge stored them as floats: always A's, never blended.
    keys = A.ckpt.keys()
    merged_keys = {k for k in keys if k in spec.shapes and part_of(k) in parts and not k.endswith("position_ids")
                   and A.ckpt.infos[k].dtype.is_floating_point}
    matched_at = 0.80 if opts.aligned else 0.03
    hash_from = matched_at
    repaired: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if opts.repair:
        hash_from = 0.84 if opts.aligned else 0.13
        report.stage(matched_at, hash_from)
        repaired = _repair(spec, A, B, opts, blend, merged_keys, final_perms, device, report, diag)

    # Hash the inputs before writing, so the output file itself is never hashed by mistake.
    write_from = 0.85 if opts.aligned else 0.15
    report.stage(hash_from, write_from)
    metadata = provenance_metadata(prep, parts, extra_metadata, report)
    baked_record = None
    if baked is not None:
        report("hashing", 1.0, f"hashing the VAE to bake in ({baked.path.name})")
        vae_sha256 = baked.sha256(hash_progress(report, f"the VAE to bake in ({baked.path.name})", 1.0, 1.0))
        baked_record = {"file": baked.path.name, "sha256": vae_sha256,
                        "folder": str(baked.path.resolve().parent)}
        webui = json.loads(metadata["sd_merge_recipe"])
        webui["bake_in_vae"] = baked.path.name
        metadata["sd_merge_recipe"] = json.dumps(webui)
        diag.baked_vae = baked.path.name
    report.stage(write_from, 1.0)

    out_dtype = PRECISIONS[opts.precision]
    if baked is not None:  # the baked VAE replaces the output's VAE: it is neither merged nor copied from A
        vae_keys = {k for k in spec.shapes if part_of(k) == "vae"}
        merged_keys -= vae_keys
        keys = keys + [k for k in spec.shapes if k in vae_keys and k not in A.ckpt.infos]
    diag.copied_from_a = sum(1 for k in keys if k not in merged_keys and not (baked and k in spec.shapes and part_of(k) == "vae"))
    diag.dropped_from_b = sum(1 for k in B.ckpt.keys() if k not in A.ckpt.infos)
    diag.kept_a_extra_channels = A.config.unet_in_channels != B.config.unet_in_channels

    # A baked VAE's keys that A lacks come after A's own.
    entries = output_entries(A, out_dtype) + [(k, tuple(spec.shapes[k]), out_dtype) for k in keys
                                              if k not in A.ckpt.infos]
    guard = OutputGuard(checked, opts.allow_nonfinite, opts.precision)
    dtypes = {k: d for k, _, d in entries}
    sizes = {k: max(1, math.prod(s)) for k, s, _ in entries}
    total = sum(sizes.values())
    done = 0
    measure = opts.aligned
    objective = {p: [0.0, 0.0, 0.0, 0.0] for p in parts}

    baked_model = [baked.checked()] if baked is not None else []

    def produce(key: str) -> torch.Tensor:
        """Every output tensor, whatever its source, leaves through the one guard."""
        nonlocal done
        report("writing", done / total, f"writing {key}")
        done += sizes[key]
        t, readers, read_as = source(key)
        return guard(key, t, readers, read_as)

    def source(key: str) -> tuple[torch.Tensor, list[Model] | None, str]:
        """The value of `key` in the output's dtype, the models it was made from, and their name for it."""
        if baked is not None and part_of(key) == "vae" and key in spec.shapes:
            return baked.get(key).to(dtypes[key]), baked_model, baked.source_key(key)
        if key not in merged_keys:
            return A.ckpt.get(key).to(dtypes[key]), checked[:1], key
        return value(key), None, key

    def finish(key: str, t: torch.Tensor) -> torch.Tensor:
        """The merged value in the output's precision, with REPAIR's correction folded in (in fp64)."""
        t = t.to("cpu")
        layer, _, kind = key.rpartition(".")
        if layer in repaired:
            scale, shift = repaired[layer]
            t = fold_weight(t, scale) if kind == "weight" else fold_bias(t, scale, shift)
        return t.to(dtypes[key])

    def value(key: str) -> torch.Tensor:
        if not (measure and spec.axes.get(key)):
            return finish(key, blend(key))
        acc = objective[part_of(key)]
        key_blend = blend.for_key(key) if isinstance(blend, BlockBlend) else blend
        if isinstance(key_blend, Blend) and len(key_blend.terms) == 2 and key_blend.terms[1].get is get_b:
            # (1-a) A + a pi(B): reuse the fp32 A and pi(B) the blend computes anyway.
            def observe(values: list[tuple[float, torch.Tensor]]) -> None:
                a, pb = values[0][1], values[1][1]
                moved = any(axis_index(spec, key, ax, final_perms) is not None for ax in spec.axes[key])
                b = get_b(key).to(pb.device, torch.float32) if moved else pb
                accumulate(acc, a, b, pb)

            return finish(key, key_blend(key, observe))
        accumulate_objective(acc, spec, key, get_a, get_b, final_perms)
        return finish(key, blend(key))

    def final_metadata() -> dict[str, str]:
        # The objective is measured while producing the keys; a file header is rewritten in place once known.
        # Wall time is reported to the caller but never stored, so the same inputs give the same bytes.
        diag.objective = {p: o for p, o in objective.items() if o[2] > 0} if measure else {}
        diag.seconds = time.perf_counter() - start
        stored = stored_diagnostics(diag)
        meta = {**metadata, "lib_rebasin": json.dumps({"version": __version__, "spec": SPEC_VERSION,
                                                        "recipe": {**recipe_of(prep, parts),
                                                                   **({"bake_vae": baked_record}
                                                                      if baked_record else {})},
                                                        "diagnostics": stored})}
        return {**meta, **metadata_hook(diag)} if metadata_hook is not None else meta

    return _Plan(entries, produce, final_metadata, diag)

def _repair(spec: ArchSpec, A: ModelInput, B: ModelInput, opts: MergeOptions, blend: Callable[[str], torch.Tensor],
            merged_keys: set[str], perms: Perms, device: torch.device, report: Reporter,
            diag: Diagnostics) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """REPAIR's per-channel corrections of the merge (repair.py), measured on the models as they will be written:
    A, B with the merge's permutations (the same function as B), and the merge (blended keys, A's elsewhere)."""
    def get_b_aligned(key: str) -> torch.Tensor:
        return permute_tensor(spec, key, B.ckpt.get(key), perms)

    def get_merge(key: str) -> torch.Tensor:
        return blend(key) if key in merged_keys else A.ckpt.get(key)

    out = corrections(spec, A.ckpt.get, get_b_aligned, get_merge, opts.alpha_of, samples=opts.activation_samples,
                      seed=opts.seed, device=device, progress=lambda f, m: report("repair", f, m))
    scales = torch.cat([s for s, _ in out.values()])
    diag.repaired_layers = len(out)
    diag.repair_samples = opts.activation_samples
    diag.repair_scale = [float(f"{float(q):.3g}") for q in scales.quantile(torch.tensor([0.1, 0.5, 0.9],
                                                                                        dtype=scales.dtype))]
    return out


def _match(spec: ArchSpec, parts: tuple[str, ...], get_ref: TensorGetter, get_b: TensorGetter,
           opts: MergeOptions, device: torch.device, init: Perms | None,
           on_progress: Callable[[MatchProgress], None], ref_is_file: bool, checked: list[Model],
           report: Reporter | None = None) -> MatchResult:
    # Each tensor matching reads is checked once as it is fetched: a NaN would make the assignment fail.
    get_ref = guard_getter(get_ref, checked[0], opts.allow_nonfinite)
    get_b = guard_getter(get_b, checked[1], opts.allow_nonfinite)
    groups = spec.groups_in(parts)
    if opts.matching == "activations":
        return _match_activations(spec, groups, get_ref, get_b, opts, device, on_progress, report)
    # On the CPU, checkpoint files are re-read on each visit rather than held (both models' size in memory); a
    # running merge is computed, so it is kept. On a GPU everything matching reads is kept there.
    on_cpu = device.type == "cpu"
    keep = (not (on_cpu and ref_is_file), not on_cpu)
    return weight_matching(spec, groups, get_ref, get_b, seed=opts.seed, max_sweeps=opts.max_sweeps, device=device,
                           init=init, progress=on_progress, tolerance=opts.tolerance, keep=keep)


def _match_activations(spec: ArchSpec, groups: list, get_ref: TensorGetter, get_b: TensorGetter,
                       opts: MergeOptions, device: torch.device, on_progress: Callable[[MatchProgress], None],
                       report: Reporter | None) -> MatchResult:
    """UNet and text-encoder groups by activation matching; VAE groups (no forward pass here, and no tensor
    shared with the other parts) by weight matching, exactly as weight matching alone would align them."""
    from .activation_matching import activation_matching

    start = time.perf_counter()
    by_activations = [g for g in groups if g.part != "vae"]
    by_weights = [g for g in groups if g.part == "vae"]

    # The forward passes take nearly all of the time; the VAE's weight matching gets the end of this share.
    share = 0.9 if by_weights else 1.0

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

    perms = activation_matching(spec, by_activations, get_ref, get_b, samples=opts.activation_samples,
                                seed=opts.seed, device=device, progress=progress)
    reports = [GroupReport(g.name, g.part, g.kind, g.size, moved=int((perms[g.name] != torch.arange(g.size)).sum())) for g in by_activations if g.name in perms]
    sweeps, converged = 0, True
    if by_weights:
        vae = weight_matching(spec, by_weights, get_ref, get_b, seed=opts.seed, max_sweeps=opts.max_sweeps,
                              device=device, progress=vae_progress, tolerance=opts.tolerance,
                              keep=(device.type != "cpu",) * 2)
        perms.update(vae.perms)
        reports += vae.groups
        sweeps, converged = vae.sweeps, vae.converged
    return MatchResult(perms, sweeps, converged, reports, time.perf_counter() - start)


def _sweep_progress(report: Reporter) -> Callable[[MatchProgress], None]:
    """Weight matching's progress as a fraction of its (unknown) number of sweeps: half in sweep 1, then ever
    closer to the end."""
    def on_progress(p: MatchProgress) -> None:
        report("matching", 1 - 1 / (p.sweep + p.index / p.total),
               f"matching: sweep {p.sweep}, group {p.index}/{p.total} {p.group}")

    return on_progress


def _iterated_rebasin(spec: ArchSpec, parts: tuple[str, ...], get_a: TensorGetter, get_b: TensorGetter,
                      get_b_like: "ModelInput", opts: MergeOptions, device: torch.device, report: Reporter,
                      diag: Diagnostics, checked: list[Model]) -> tuple[Blend, Perms]:
    """(1-a)A + a pi(B), or its iterations form; returns the final blend and the last permutation.

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
            result = _match(spec, parts, shared_window(get_a, get_b_like) if x == 0 else
                            shared_window(running, get_b_like), get_b, opts, device, perms,
                            _sweep_progress(report), ref_is_file=x == 0, checked=checked, report=report)
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


def _alphas_in(spec: ArchSpec, parts: tuple[str, ...], opts: MergeOptions) -> list[float]:
    """The distinct weights of B over every key of the spec (just alpha without block weights). All keys, not only
    the merged parts': a group's cost can read keys of another part (the text encoder's residual stream feeds the
    UNet's cross-attention), and the running merge must have a value for each."""
    if opts.blocks is None:
        return [opts.alpha]
    return sorted({opts.alpha_of(k) for k in spec.shapes if part_of(k) != "other"})


def _tracks_blend(spec: ArchSpec, tracks: dict[float, list[Term]], opts: MergeOptions, device: torch.device,
                  merge: bool) -> "Blend | BlockBlend":
    def blend_for(al: float) -> Blend:
        terms = tracks[al]
        return Blend(spec, merge_equal_terms(terms) if merge else terms, device)

    if opts.blocks is None:
        return blend_for(opts.alpha)
    return BlockBlend(blend_for, _alpha_lookup(opts))


def _alpha_lookup(opts: MergeOptions) -> Callable[[str], float]:
    """opts.alpha_of, remembered per key (the merge asks for each key several times)."""
    cache: dict[str, float] = {}

    def alpha_of(key: str) -> float:
        if key not in cache:
            cache[key] = opts.alpha_of(key)
        return cache[key]

    return alpha_of


def _align_once(spec: ArchSpec, parts: tuple[str, ...], get_a: TensorGetter, get_b: TensorGetter,
                get_b_like: "ModelInput", opts: MergeOptions, device: torch.device, report: Reporter,
                diag: Diagnostics, checked: list[Model]) -> Perms:
    """Re-basin alignment of B onto A for any method: one weight-matching run; C later gets B's permutation.

    C is normally the base B was tuned from, so it lives in B's basin: permuting it with B's permutation keeps
    B - C a true task vector, now in A's coordinates (matching C on its own would scramble that difference)."""
    result = _match(spec, parts, shared_window(get_a, get_b_like), get_b, opts, device, None,
                    _sweep_progress(report), ref_is_file=True, checked=checked, report=report)
    diag.matched = True
    diag.match_steps = 1
    diag.sweeps.append(result.sweeps)
    diag.solves += result.solves
    diag.certified += result.certified
    diag.converged = result.converged
    _record_moves(diag, result)
    return {k: p for k, p in result.perms.items() if not is_identity(p)}


def _method_blend(spec: ArchSpec, prep: "Prepared", opts: MergeOptions, perms: Perms,
                  device: torch.device) -> Callable[[str], torch.Tensor]:
    """How a registry method produces each key: its exact linear blend when it has one, else its function."""
    info = METHODS[opts.method]
    get_a, get_b = prep.a.ckpt.get, prep.b.ckpt.get
    get_c = prep.c.ckpt.get if (prep.c is not None and info.needs_c) else None
    if info.linear is not None:
        def blend_for(alpha: float) -> Blend:
            wa, wb, wc = info.linear(alpha)  # type: ignore[misc]
            terms = [Term(wa, get_a, {}), Term(wb, get_b, perms)]
            if get_c is not None:
                terms.append(Term(wc, get_c, perms))
            return Blend(spec, terms, device)

        return blend_for(opts.alpha) if opts.blocks is None else BlockBlend(blend_for, _alpha_lookup(opts))
    assert info.fn is not None
    alpha_of = _alpha_lookup(opts) if opts.blocks is not None else (lambda key: opts.alpha)
    return KeyFunctionBlend(spec, info.fn, get_a, get_b, get_c, perms, alpha_of, opts.method_params(), opts.seed,
                            device)


def _record_moves(diag: Diagnostics, result: MatchResult) -> None:
    diag.moved = {p: [m, n] for p, (m, n) in result.moved_by_part().items()}
    moved = sorted((g for g in result.groups if g.moved), key=lambda g: -g.moved / g.size)
    diag.top_groups = [(g.name, g.moved, g.size) for g in moved[:10]]


def _legacy_blend(spec: ArchSpec, get_a: TensorGetter, get_b: TensorGetter, opts: MergeOptions,
                  device: torch.device, report: Reporter, checked: list[Model]) -> Callable[[str], torch.Tensor]:
    """T0b1maru/re-basin_merger's result (see legacy.py): a weighted sum, except six GroupNorm vectors that the
    tool re-matches every iteration; those are iterated exactly (they are tiny), everything else is one blend."""
    from .legacy import SPECIAL_KEYS, legacy_special_tensors

    special = legacy_special_tensors(
        guard_getter(get_a, checked[0], opts.allow_nonfinite), guard_getter(get_b, checked[1], opts.allow_nonfinite),
        opts.alpha, opts.iterations,
        on_iteration=lambda done, total: report("matching", done / total,
                                                f"legacy: iteration {done}/{total} (three output GroupNorms)"))
    weighted = Blend(spec, [Term(1 - opts.alpha, get_a, {}), Term(opts.alpha, get_b, {})], device)

    def value(key: str) -> torch.Tensor:
        return special[key] if key in SPECIAL_KEYS else weighted(key)

    return value

