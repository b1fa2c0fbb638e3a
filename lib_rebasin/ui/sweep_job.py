"""A sweep as a job of the HTTP API (`POST /rebasin/v1/sweep`): a merge request whose `alpha` is a list and whose
`output_name` is a template with {alpha}; one file per value, B matched onto A once (merge/sweep.py).

It runs as a job of the same `MergeService` as a merge: one job at a time, the same progress (each message names
the candidate), `GET /jobs/{id}` and `POST /jobs/{id}/cancel`. A cancel stops the candidate being computed with
no partial file; the files already finished stay and the job says which.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import Cancelled, FieldError
from ..io.model_input import open_model
from ..io.output_file import output_bytes
from ..io.precisions import PRECISIONS
from ..merge.preflight import output_entries
from ..merge.run import MergeResult
from ..merge.sweep import alpha_label, check_room, output_names, sweep_checkpoints, sweep_options
from .job import Job, Prepared
from .job_runner import cancelled_of, execute, progress_of
from .request import MergeRequest, _number
from .service import MergeService, new_job_id


@dataclass
class PreparedSweep:
    request: MergeRequest
    alphas: list[float]
    candidates: list[Prepared]  # each checked as the single merge at its alpha would be

    @property
    def output(self) -> Path:
        """The last candidate's file: its commit ends the job (the API's "too late to cancel")."""
        return self.candidates[-1].output

    @property
    def devices(self) -> list[str]:
        return [self.request.device]

    def request_dict(self) -> dict[str, Any]:
        return {**self.candidates[0].request_dict(), "alpha": list(self.alphas),
                "outputs": [p.output.name for p in self.candidates]}


@dataclass
class SweepJob(Job):
    outputs: list[Path] = field(default_factory=list)  # the files finished so far, in the order of the alphas

    def status_line(self, eta: bool = True) -> str:
        names = ", ".join(p.name for p in self.outputs)
        if self.status == "done":
            return f"Done in {self.seconds or 0:.1f}s: saved {len(self.outputs)} files: {names}."
        if self.status in ("cancelled", "failed") and self.outputs:
            what = "Stopped" if self.status == "cancelled" else f"Failed: {self.error}"
            return f"{what}; kept the finished file(s) {names}; no partial file was written."
        return super().status_line(eta)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "kind": "sweep", "outputs": [str(p) for p in self.outputs]}


def sweep_request(body: Any) -> tuple[MergeRequest, list[float]]:
    """The merge request and its alphas from a sweep body (a merge's fields; `alpha` a list of numbers)."""
    if not isinstance(body, dict):
        raise FieldError("body", "The request body must be a JSON object.")
    raw = body.get("alpha", [])
    values = raw if isinstance(raw, list) else [raw]
    alphas = [_number("alpha", v) for v in values]
    if not alphas:
        raise FieldError("alpha", "A sweep needs 'alpha': a list of values, e.g. [0.25, 0.5, 0.75].")
    req = MergeRequest.from_dict({**body, "alpha": alphas[0]})
    return req, alphas


def prepare_sweep(service: MergeService, req: MergeRequest, alphas: list[float]) -> PreparedSweep:
    """Every candidate checked as its single merge would be (models, options, output name, inputs' headers), and
    the names apart, before anything runs."""
    sweep_options(req.options(), alphas)  # each value for the method: a FieldError naming alpha and the value
    template = req.output_name or ""
    names = output_names(template, alphas, "output_name") if template.strip() else [""] * len(alphas)
    candidates = []
    for alpha, name in zip(alphas, names, strict=True):
        candidates.append(service.prepare(replace(req, alpha=alpha, output_name=name)))  # type: ignore[type-var]
    outputs = [p.output for p in candidates]
    for i, out in enumerate(outputs):
        if out in outputs[:i]:
            raise FieldError("output_name", f"alpha {alpha_label(alphas[outputs.index(out)])} and "
                                            f"{alpha_label(alphas[i])} give the same output name {out.name}; use a "
                                            "format such as {alpha:.3f}.")
    first = candidates[0]
    a = open_model(first.a.path, "A")
    try:  # room for every file, before the job starts (the core checks again before any work)
        check_room(outputs, output_bytes(output_entries(a, PRECISIONS[first.options.precision])))
    finally:
        a.close()
    return PreparedSweep(req, alphas, candidates)


def submit_sweep(service: MergeService, body: Any, job_id: str | None = None) -> SweepJob:
    req, alphas = sweep_request(body)
    return start_sweep(service, req, alphas, job_id)


def start_sweep(service: MergeService, req: MergeRequest, alphas: list[float], job_id: str | None = None) -> SweepJob:
    """Check every candidate (prepare_sweep), then run the sweep as the service's one job."""
    prepared = prepare_sweep(service, req, alphas)
    job = service.register(SweepJob(job_id or new_job_id(), prepared))  # type: ignore[arg-type]  # a sweep
    threading.Thread(target=_run, args=(service, job, prepared), name=f"rebasin-{job.id}", daemon=True).start()
    return job


def _run(service: MergeService, job: SweepJob, p: PreparedSweep) -> None:
    host = service.host
    first = p.candidates[0]
    cancelled = cancelled_of(host, job)

    def commit(output: Path) -> None:
        with service._lock:  # against service.cancel: a cancel is either seen here or refused as too late
            if cancelled():
                raise Cancelled()
            job.committed = output == p.output  # only the last file's commit ends the job

    def written(result: MergeResult) -> None:
        job.outputs.append(Path(result.output))

    def work() -> None:
        host.prepare_device(first.request.device)
        try:
            results = sweep_checkpoints(
                first.a.path, first.b.path, [c.output for c in p.candidates], first.options, p.alphas,
                c=first.c.path if first.c else None, overwrite=p.request.overwrite, progress=progress_of(host, job),
                cancel=cancelled, extra_metadata={"lib_rebasin_host": host.name}, on_commit=commit,
                on_written=written, bake_vae=first.bake_vae.path if first.bake_vae else None)
        finally:
            host.restore_device(first.request.device)
        job.output = job.outputs[-1]
        job.summary = [f"alpha {alpha_label(r.diagnostics.alpha)}: {r.output.name}" for r in results]
        job.diagnostics = {"candidates": [{"output": r.output.name, **r.diagnostics.to_dict()} for r in results]}
        job.seconds = time.time() - job.started

    def register_files() -> None:
        """The files that exist, whatever ended the job, are the host's checkpoints now."""
        inputs = [e.path for e in (first.a, first.b, first.c) if e is not None]
        if job.outputs:
            host.remember_hashes([*job.outputs, *inputs])
        for out in job.outputs:
            host.after_save(out)

    execute(host, job, work, lambda: "Saved.", after=register_files)
