"""A sweep: the same merge at several alphas, each candidate exactly the single merge at its alpha, matching once.

Re-basin's permutation (weight matching or activation matching of B onto A) does not read alpha, so the
candidates share it (`merge/first_match.py`); what does depend on alpha runs per candidate: the blend, the later
steps of the iterations form (they match against the running merge), REPAIR (it measures the merged model) and
a random method's masks (drawn from the same seed as the single merge, so the bytes match). The inputs are opened
and hashed once; each output file is written atomically as a single merge writes it, with the same metadata.

Everything is checked before any work: every alpha for the method (a FieldError naming `alpha` and the value),
every output name from the template, and the free space for all of them. A cancel or an error stops the sweep
with no partial file; the candidates already written stay, and the message names them.
"""

from __future__ import annotations

import os
import string
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

from ..arguments import check_arguments
from ..compute import merge_compute
from ..errors import Cancelled, FieldError, InputChangedError, RebasinError
from ..io.checkpoint import Checkpoint, memory_checkpoint
from ..io.model_input import Source, same_file
from ..io.output_file import check_free_space, check_output_path, output_bytes
from ..io.precisions import PRECISIONS
from ..messages import shown
from ..methods import METHODS
from ..options import OPTIONS, MergeOptions
from ..progress import CancelCheck, ProgressCallback, Reporter
from .diagnostics import Diagnostics
from .first_match import FirstMatch
from .metadata import MetadataHook
from .preflight import Prepared, output_entries, preflight
from .run import MergeResult, _plan, opened_inputs, write_plan
from .stages import HEADERS_READ, merge_bar

# The field of the template (`AB_{alpha}.safetensors`); `{alpha:.2f}` formats it, `{alpha}` is the shortest form.
FIELD = "alpha"
MAX_CANDIDATES = 64


class _Shown(float):
    """An alpha in an output name: `{alpha}` as 0.25 (not 0.25000000000000001), a format spec as given."""

    def __format__(self, spec: str) -> str:
        return format(float(self), spec or "g")


def alpha_label(alpha: float) -> str:
    return format(_Shown(alpha))


def sweep_options(options: MergeOptions, alphas: Sequence[float]) -> list[MergeOptions]:
    """The options of each candidate (the given ones at each alpha), each checked like a single merge's; a bad
    value is a FieldError naming `alpha` and the value, before any file is opened."""
    if isinstance(alphas, (str, bytes)) or not isinstance(alphas, Sequence):
        raise FieldError(FIELD, f"alpha values must be a list of numbers, got {shown(alphas)}.")
    if not alphas:
        raise FieldError(FIELD, "A sweep needs at least one alpha value.")
    if len(alphas) > MAX_CANDIDATES:
        raise FieldError(FIELD, f"A sweep takes at most {MAX_CANDIDATES} alpha values, got {len(alphas)}.")
    options.validate()
    info = METHODS[options.method]
    if not OPTIONS[FIELD].applies_to(info):
        raise FieldError(FIELD, f"{info.label} does not use alpha; a sweep over alpha would write the same merge "
                                "several times.")
    if options.blocks is not None:
        raise FieldError("blocks", "A sweep varies alpha, and with block weights each block has its own weight of "
                                   "B; sweep without block weights, or run one merge per set of block weights.")
    out: list[MergeOptions] = []
    seen: set[float] = set()
    for i, a in enumerate(alphas, 1):
        problem = OPTIONS[FIELD].problem(a, info)
        if problem:
            raise FieldError(FIELD, f"alpha value {i} of {len(alphas)}: {problem}")
        if float(a) in seen:
            raise FieldError(FIELD, f"alpha {alpha_label(a)} is listed twice; each candidate needs its own value.")
        seen.add(float(a))
        candidate = replace(options, **{FIELD: a})
        candidate.validate()
        out.append(candidate)
    return out


Outputs = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]


def output_names(template: str, alphas: Sequence[float], field: str = "output") -> list[str]:
    """Each candidate's name from `template` (`{alpha}` required when there is more than one value); a
    FieldError on `field` otherwise."""
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
        names = [template.format(**{FIELD: _Shown(a)}) for a in alphas]
    except (ValueError, KeyError, IndexError, AttributeError) as e:
        raise FieldError(field, f"The output name {shown(template, 80)} is not a template with {{{FIELD}}} as its "
                                f"only field ({e}); write braces in a name as {{{{ and }}}}.") from None
    if len(alphas) > 1 and fields != {FIELD}:
        raise FieldError(field, f"The output name {shown(template, 80)} must contain {{{FIELD}}} (e.g. "
                                f"AB_{{{FIELD}}}.safetensors) so that each of the {len(alphas)} candidates gets "
                                "its own file.")
    return names


def sweep_outputs(output: Outputs, alphas: Sequence[float], overwrite: bool = False) -> list[Path]:
    """Each candidate's output path, from a template or given one per alpha, each checked as a single merge's
    output is; a FieldError on `output` for a name that does not give every candidate its own file."""
    if isinstance(output, (str, os.PathLike)):
        names: Sequence[str | os.PathLike[str]] = output_names(os.fspath(output), alphas)
    else:
        names = list(output)
        if len(names) != len(alphas):
            raise FieldError("output", f"A sweep of {len(alphas)} alpha values needs as many outputs, got "
                                       f"{len(names)}.")
    paths = [check_output_path(n, overwrite) for n in names]
    resolved = [p.resolve() for p in paths]
    for i, p in enumerate(resolved):
        if p in resolved[:i]:
            raise FieldError("output", f"alpha {alpha_label(alphas[resolved.index(p)])} and "
                                       f"{alpha_label(alphas[i])} give the same output name {paths[i].name}; "
                                       "use a format such as {alpha:.3f}.")
    return paths


def _check_outputs_apart(prep: Prepared, outputs: list[Path]) -> None:
    """No output overwrites an input, and every output's folder has room for all the candidates it gets."""
    for out in outputs:
        for m in (prep.a, prep.b, prep.c):
            if m is not None and not m.in_memory and out.exists() and same_file(m.path, out):
                raise RebasinError(f"The output {out.name} would overwrite an input model; choose another name.")
    check_room(outputs, output_bytes(output_entries(prep.a, PRECISIONS[prep.options.precision])))


def check_room(outputs: list[Path], size: int) -> None:
    """Every output's folder has room for all the files of `size` bytes it gets (OutputError otherwise)."""
    folders: dict[Path, list[Path]] = {}
    for out in outputs:
        folders.setdefault(out.parent.resolve(), []).append(out)
    for group in folders.values():
        check_free_space(group[0], size * len(group))


def _shares(options: MergeOptions, n: int, shared: bool) -> list[tuple[float, float]]:
    """Each candidate's share of the one bar: the first does the matching the others reuse."""
    bar = merge_bar(options.aligned, options.repair)
    rest = 1.0 - (bar.matched - HEADERS_READ) if shared else 1.0
    weights = [1.0] + [rest] * (n - 1)
    total, lo, out = sum(weights), 0.0, []
    for w in weights:
        out.append((lo / total, (lo + w) / total))
        lo += w
    return out


def _step_name(alpha: float, k: int, n: int) -> str:
    return f"alpha {alpha_label(alpha)} ({k + 1}/{n})"


def _stopped(e: RebasinError, done: list[Path]) -> RebasinError:
    """The error that stopped the sweep, naming the candidates already written (they stay)."""
    if not done:
        return e
    kept = ", ".join(p.name for p in done)
    if isinstance(e, Cancelled):
        return Cancelled(f"Cancelled; kept the {len(done)} finished file(s) {kept}; no partial file was written.")
    e.args = (f"{e} The {len(done)} finished file(s) {kept} stay.",)
    return e


def sweep_checkpoints(a: Source, b: Source, output: Outputs, options: MergeOptions,
                      alphas: Sequence[float], c: Source | None = None, overwrite: bool = False,
                      progress: ProgressCallback | None = None, cancel: CancelCheck | None = None,
                      extra_metadata: dict[str, str] | None = None,
                      bake_vae: str | os.PathLike[str] | Checkpoint | None = None,
                      on_commit: Callable[[Path], None] | None = None,
                      on_written: Callable[[MergeResult], None] | None = None,
                      metadata_hook: MetadataHook | None = None,
                      first: FirstMatch | None = None) -> list[MergeResult]:
    """One file per alpha, named by the template `output` ("AB_{alpha}.safetensors", or a list of one path per
    alpha); each holds exactly the tensors and metadata that `merge_checkpoints(a, b, <name>, replace(options,
    alpha=value), ...)` writes. B is matched onto A once (`first` counts it). `on_commit(path)` runs at each file's
    commit, as in `merge_checkpoints`, and `on_written(result)` once that file is in place, before the next
    candidate starts; `metadata_hook(diag)` as in `merge_checkpoints` (`diag.alpha` says which candidate).
    Raises RebasinError before any work for a bad value or name; a cancel leaves the finished files only."""
    check_arguments("sweep_checkpoints", a=a, b=b, options=options, c=c, overwrite=overwrite,
                    progress=progress, cancel=cancel, extra_metadata=extra_metadata, bake_vae=bake_vae,
                    metadata_hook=metadata_hook)
    for path in output if isinstance(output, (list, tuple)) else [output]:
        check_arguments("sweep_checkpoints", output=path)
    candidates = sweep_options(options, alphas)
    outputs = sweep_outputs(output, alphas, overwrite)
    report = Reporter(progress, None)  # cancels are checked by each candidate's own reporter and between them
    report.stage(0.0, HEADERS_READ)
    report("loading", 0.0, "reading checkpoint headers")
    with merge_compute():
        prep = preflight(a, b, outputs[0], candidates[0], c, overwrite)
    first = first or FirstMatch()
    done: list[Path] = []
    results: list[MergeResult] = []
    baked = None
    try:
        _check_outputs_apart(prep, outputs)
        if bake_vae is not None:
            from .vae_bake import open_vae

            baked = open_vae(bake_vae, prep.a.spec)
        report.stage(HEADERS_READ, 1.0)
        shares = _shares(candidates[0], len(candidates), shared=True)
        for k, (opts, out) in enumerate(zip(candidates, outputs, strict=True)):
            if cancel is not None and cancel():
                raise Cancelled()
            sub = Reporter(report.relay(*shares[k], _step_name(opts.alpha, k, len(candidates))), cancel)
            one = replace(prep, options=opts, output=out)
            with merge_compute():
                plan = _plan(one, sub, extra_metadata or {}, metadata_hook, baked, first)
                results.append(write_plan(one, plan, sub, on_commit))
            done.append(results[-1].output)
            if on_written is not None:
                on_written(results[-1])
        return results
    except InputChangedError as e:
        raise _stopped(prep.changed_error(e), done) from None
    except RebasinError as e:
        raise _stopped(e, done) from None
    except KeyboardInterrupt:
        raise _stopped(Cancelled(), done) from None
    finally:
        prep.close()
        if baked is not None:
            baked.close()


def sweep_in_memory(a: Source, b: Source, options: MergeOptions, alphas: Sequence[float], c: Source | None = None,
                    report: Reporter | None = None, name: str = "merged",
                    first: FirstMatch | None = None) -> Iterator[tuple[float, Checkpoint, Diagnostics]]:
    """(alpha, checkpoint, diagnostics) per alpha, in order, each exactly `merge_in_memory` at that alpha; B is
    matched onto A once. Every value is checked before the first result; the inputs stay open until the generator
    is exhausted or closed. `name` may contain {alpha}."""
    check_arguments("sweep_in_memory", a=a, b=b, options=options, c=c, report=report, name=name)
    candidates = sweep_options(options, alphas)
    names = output_names(name, alphas, "name") if "{" in name else [name] * len(alphas)
    return _in_memory(a, b, candidates, c, report or Reporter(None, None), names, first or FirstMatch())


def _in_memory(a: Source, b: Source, candidates: list[MergeOptions], c: Source | None, report: Reporter,
               names: list[str], first: FirstMatch) -> Iterator[tuple[float, Checkpoint, Diagnostics]]:
    with merge_compute():
        prep = preflight(a, b, None, candidates[0], c)
    with opened_inputs(prep):
        shares = _shares(candidates[0], len(candidates), shared=True)
        for k, opts in enumerate(candidates):
            sub = Reporter(report.relay(*shares[k], _step_name(opts.alpha, k, len(candidates))), report.cancel)
            one = replace(prep, options=opts)
            with merge_compute():
                plan = _plan(one, sub, {}, None, None, first)
                tensors = {key: plan.produce(key) for key, _, _ in plan.entries}
                prep.verify_unchanged()
                metadata = plan.metadata()
            yield opts.alpha, memory_checkpoint(tensors, metadata, names[k]), plan.diagnostics


def parse_alphas(text: str) -> list[float]:
    """"0.25,0.5,0.75" (the CLI's --alpha) as numbers; a FieldError on `alpha` naming the item that is none."""
    out = []
    for item in text.split(","):
        try:
            out.append(float(item.strip()))
        except ValueError:
            raise FieldError(FIELD, f"alpha must be a number or a comma-separated list of numbers; "
                                    f"{shown(item.strip(), 40)} is not a number.") from None
    return out


def is_sweep(alphas: Iterable[float], output: str | os.PathLike[str]) -> bool:
    """Whether a merge asked for with these alphas and this output name is a sweep (several values, or a name
    with the {alpha} field), rather than the single merge it always was."""
    return len(list(alphas)) > 1 or "{" + FIELD in os.fspath(output)

