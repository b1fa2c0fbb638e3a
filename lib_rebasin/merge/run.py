"""Running one merge: the inputs checked and opened, the plan that produces every output key, and the streamed,
atomic write (or, for a recipe's intermediate step, the same tensors kept in memory).

Every method reduces to a *blend* (`merge/blend.py`): a linear combination of source models, each possibly permuted,
evaluated key by key while the output is streamed to disk:

    weighted_sum     (1-a) A + a B
    add_difference   A + a (B - C)
    rebasin          (1-a) A + a pi(B),  pi = weight matching of B onto A
    rebasin, N>1     the "iterations" form (`merge/iterated_rebasin.py`): a is stepped so the steps telescope to a, and
                     B is re-aligned to the running merge at each step, warm-started from the previous permutation.

A plan runs in stages, each in its own module: the inputs (`merge/preflight.py`), the alignment and the blend
(`merge/alignment.py`, `merge/iterated_rebasin.py`, `merge/method_blend.py`), REPAIR (`merge/repair_step.py`), the
inputs' hashes and the metadata (`merge/metadata.py`), and the output tensors (`merge/output.py`); the progress bar's
share of each stage is `merge/stages.py`.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..arguments import check_arguments
from ..compute import with_merge_compute
from ..errors import InputChangedError, OutputError
from ..io.checkpoint import Checkpoint, memory_checkpoint
from ..io.finite import Model
from ..io.model_input import Source
from ..io.output_file import FULL_DISK_ERRNOS, format_bytes, write_safetensors
from ..memory import trim_free_pages, with_reused_heap
from ..options import MergeOptions
from ..progress import CancelCheck, ProgressCallback, Reporter
from .alignment import align_once
from .diagnostics import Diagnostics
from .first_match import FirstMatch
from .iterated_rebasin import iterated_rebasin
from .metadata import MetadataHook, begin_diagnostics, hashed_provenance, output_metadata
from .method_blend import legacy_blend, method_blend
from .output import OutputSources, OutputTensors, merged_keys
from .preflight import Prepared, preflight
from .repair_step import Corrections, repair_corrections
from .stages import HEADERS_READ, merge_bar
from .vae_bake import BakedVAE, open_vae


@dataclass
class MergeResult:
    output: Path
    diagnostics: Diagnostics
    metadata: dict[str, str]
    seconds: float


@with_merge_compute
@with_reused_heap
def merge_checkpoints(a: Source, b: Source, output: str | os.PathLike[str],
                      options: MergeOptions = MergeOptions(), c: Source | None = None,
                      overwrite: bool = False, progress: ProgressCallback | None = None,
                      cancel: CancelCheck | None = None, extra_metadata: dict[str, str] | None = None,
                      metadata_hook: Callable[[Diagnostics], dict[str, str]] | None = None,
                      bake_vae: str | os.PathLike[str] | Checkpoint | None = None,
                      on_commit: Callable[[Path], None] | None = None,
                      first: FirstMatch | None = None) -> MergeResult:
    """Run one merge and write it atomically to `output`. Raises RebasinError (incl. Cancelled); no file then.

    `metadata_hook(diagnostics)` may replace metadata entries once the merge is done (recipes store the whole
    chain's provenance there). `bake_vae` is a VAE file (or a checkpoint; a path, or a Checkpoint the caller
    opened and closes) whose VAE replaces the output's (merge/vae_bake.py), checked before any work.

    The commit is the one point that decides how a cancel ends: once every byte is written and checked, a last
    cancel check runs, then `on_commit(output)` (it may raise Cancelled: nothing is written then); from its return
    on the file is put in place and the merge has succeeded, so no cancel check raises any more. Only an error
    of the system itself (a full disk at the flush, a name that appeared meanwhile) can still stop it, and then
    no file has the output's name. `first` reuses the match of B onto A another merge of the pair made (a sweep's,
    a compare grid's candidate saved later): the same bytes, without matching again.
    """
    check_arguments("merge_checkpoints", a=a, b=b, output=output, options=options, c=c, overwrite=overwrite,
                    progress=progress, cancel=cancel, extra_metadata=extra_metadata, metadata_hook=metadata_hook,
                    bake_vae=bake_vae)
    report = Reporter(progress, cancel)
    report.stage(0.0, HEADERS_READ)
    report("loading", 0.0, "reading checkpoint headers")
    prep = preflight(a, b, output, options, c, overwrite)
    with opened_inputs(prep, bake_vae) as baked:
        plan = _plan(prep, report, extra_metadata or {}, metadata_hook, baked, first)
        return write_plan(prep, plan, report, on_commit)


@contextmanager
def opened_inputs(prep: Prepared, bake_vae: str | os.PathLike[str] | Checkpoint | None = None
                  ) -> Iterator[BakedVAE | None]:
    """A checked merge's inputs and the VAE to bake (opened here), for the merge's body: an input that changed on
    disk meanwhile becomes the merge's one-line error, and everything is closed after, whatever happens."""
    baked = None
    try:
        if bake_vae is not None:
            baked = open_vae(bake_vae, prep.a.spec)
        yield baked
    except InputChangedError as e:
        raise prep.changed_error(e) from None
    finally:
        prep.close()
        if baked is not None:
            baked.close()


def write_plan(prep: Prepared, plan: _Plan, report: Reporter,
               on_commit: Callable[[Path], None] | None) -> MergeResult:
    """Stream a plan's tensors into `prep.output`, atomically, with the commit `merge_checkpoints` describes."""
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
        out = write_safetensors(output, plan.entries, plan.produce, plan.metadata(),
                                overwrite=prep.overwrite, finalize_metadata=final_metadata, streamed=True)
    except OSError as e:
        if e.errno not in FULL_DISK_ERRNOS:
            raise
        raise _full_disk(output, e) from None
    report("writing", 1.0, "done")
    return MergeResult(out, plan.diagnostics, written, plan.diagnostics.seconds)


def _commit(report: Reporter, on_commit: Callable[[Path], None] | None, output: Path) -> None:
    """The last moment a cancel leaves no file; after it the output is put in place and the merge has succeeded."""
    report.check()
    if on_commit is not None:
        on_commit(output)
    report.committed = True


@with_merge_compute
@with_reused_heap
def merge_in_memory(a: Source, b: Source, options: MergeOptions, c: Source | None = None,
                    report: Reporter | None = None, name: str = "merged") -> tuple[Checkpoint, Diagnostics]:
    """The same merge, kept in memory (a recipe's intermediate step): the tensors are exactly those
    `merge_checkpoints` would write, so reading that file back would give the same bytes."""
    check_arguments("merge_in_memory", a=a, b=b, options=options, c=c, report=report, name=name)
    report = report or Reporter(None, None)
    prep = preflight(a, b, None, options, c)
    with opened_inputs(prep):
        plan = _plan(prep, report, {}, None)
        tensors = {key: plan.produce(key) for key, _, _ in plan.entries}
        prep.verify_unchanged()
        metadata = plan.metadata()
    return memory_checkpoint(tensors, metadata, name), plan.diagnostics


def _full_disk(output: Path, e: OSError) -> OutputError:
    folder = output.parent.resolve()
    try:
        free = f", {format_bytes(shutil.disk_usage(folder).free)} free"
    except OSError:
        free = ""
    return OutputError(f"Writing {output.name} failed: {e.strerror} in {folder}{free}; nothing was written. Free "
                       "some space or choose another folder.")


@dataclass
class _Plan:
    entries: list[tuple[str, tuple[int, ...], torch.dtype]]
    produce: Callable[..., torch.Tensor]  # (key), or (key, sink): `OutputTensors.produce`
    metadata: Callable[[], dict[str, str]]
    diagnostics: Diagnostics


def _plan(prep: Prepared, report: Reporter, extra_metadata: dict[str, str], metadata_hook: MetadataHook | None,
          baked: BakedVAE | None = None, first: FirstMatch | None = None) -> _Plan:
    """Match (if needed) and return how to produce every output key, in A's key order. `first` shares the match of
    B onto A itself between plans that differ only in alpha (a sweep, `merge/sweep.py`)."""
    start = time.perf_counter()
    opts = prep.options
    A, B = prep.a, prep.b
    spec = A.spec
    parts = tuple(p for p in opts.parts if p in A.parts)
    device = torch.device(opts.device)
    diag = begin_diagnostics(opts, parts)
    get_a, get_b = A.ckpt.get, B.ckpt.get
    checked = [Model(m.label, m.path.name, m.ckpt.get, m.ckpt.keys()) for m in (A, B, prep.c) if m is not None]
    bar = merge_bar(opts.aligned, opts.repair)
    merged = merged_keys(A, parts)
    sources = OutputSources(prep, merged, baked, checked)
    sources.check_unblended()  # before any work, and before the output is opened

    report.stage(HEADERS_READ, bar.matched)
    blend: Callable[[str], torch.Tensor]
    if opts.method == "rebasin":
        blend, perms = iterated_rebasin(spec, parts, get_a, get_b, B, opts, device, report, diag, checked[:2],
                                       first)
    elif opts.method == "legacy":
        blend, perms = legacy_blend(spec, get_a, get_b, opts, device, report, checked[:2]), {}
    else:
        perms = align_once(spec, parts, get_a, get_b, B, opts, device, report, diag, checked[:2],
                           first) if opts.align else {}
        blend = method_blend(spec, prep, opts, perms, device)

    repaired: Corrections = {}
    if opts.repair:
        report.stage(bar.matched, bar.repaired)
        repaired = repair_corrections(spec, A, B, opts, blend, merged, perms, device, report, diag)

    # What matching and REPAIR freed (a proof's matrices, cost matrices, forward passes' buffers) stays resident in
    # the merge's reused heap; the output's first keys (a text encoder's 76 MB token embedding, A's, B's and the
    # output's copies) did not always fit in its free blocks, and the heap then grew by them on top of it all.
    trim_free_pages()
    report.stage(bar.repaired, bar.hashed)
    provenance, baked_record = hashed_provenance(prep, parts, extra_metadata, baked, report, diag)

    report.stage(bar.hashed, 1.0)
    # get_b is the very getter the re-basin blend's terms hold: the output recognises (1-a) A + a pi(B) by it.
    output = OutputTensors(prep, parts, blend, sources, perms, repaired, get_b, report, diag)

    def final_metadata() -> dict[str, str]:
        # The objective is measured while producing the keys; a file header is rewritten in place once known.
        # Wall time is reported to the caller but never stored, so the same inputs give the same bytes.
        diag.objective = output.objective()
        diag.seconds = time.perf_counter() - start
        return output_metadata(prep, parts, provenance, baked_record, diag, metadata_hook)

    return _Plan(output.entries, output.produce, final_metadata, diag)
