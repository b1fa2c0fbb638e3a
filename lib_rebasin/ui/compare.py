"""A compare grid: the same merge over one axis (alpha values, methods, or block-weight presets), each candidate
merged in memory, loaded into the host's generator and drawn with the same prompt and seed; one labelled grid.

Every candidate is checked as the single merge with its value would be (`MergeService.prepare`) before anything
runs; the candidates of an alpha or block-preset axis share one match of B onto A (`FirstMatch`), a methods axis
matches once per method. The finished job keeps each candidate's prepared merge, with its match, so "Load" and
"Save" of one candidate (`load_candidate`, `save_candidate`) reuse the match: the same bytes as a direct merge.
The run itself is in compare_run.py.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import FieldError, RebasinError
from ..merge.block_presets import PRESETS
from ..merge.first_match import FirstMatch
from ..merge.sweep import alpha_label
from ..messages import shown
from ..methods import METHODS
from .compare_grid import available_memory, check_grid
from .generation import GenerationSettings
from .host import NO_GENERATOR_COMPARE
from .job import Job, Prepared
from .request import MergeRequest
from .service import MergeService, new_job_id
from .unsaved import unsaved_label

AXES = ("alpha", "method", "blocks")
MAX_CANDIDATES = 12
COMPARE_FIELDS = ("axis", "values", "generation")


@dataclass
class Candidate:
    value: str  # the axis value as the grid's label shows it
    prepared: Prepared  # the single merge with that value, checked; `.first` is the match it shares
    label: str  # what the host shows while it is loaded, and the infotext's model: names the candidate
    infotext: str = ""


@dataclass
class PreparedCompare:
    request: MergeRequest
    axis: str
    candidates: list[Candidate]
    settings: GenerationSettings

    @property
    def output(self) -> Path:
        return self.candidates[0].prepared.output

    @property
    def devices(self) -> list[str]:
        return [self.request.device]

    def request_dict(self) -> dict[str, Any]:
        return {**self.candidates[0].prepared.request_dict(), "axis": self.axis,
                "values": [c.value for c in self.candidates], "generation": self.settings.to_dict()}


@dataclass
class CompareJob(Job):
    grid: Path | None = None  # the saved grid picture
    grid_image: Any = None  # the grid as a PIL image (the tab shows it)
    done: int = 0  # candidates generated so far
    seed: int | None = None  # the seed every candidate used
    restored: str = ""  # what the host has loaded again after the grid

    @property
    def compare(self) -> PreparedCompare:
        assert isinstance(self.prepared, PreparedCompare)
        return self.prepared

    def status_line_cancelled(self) -> str:
        n = len(self.compare.candidates)
        return (f"Stopped after {self.done} of {n} candidates; no grid was saved. "
                f"{self.restored or 'The model loaded before is kept.'}")

    def status_line(self, eta: bool = True) -> str:
        if self.status == "done":
            where = f" saved as {self.grid.name}" if self.grid else ""
            return (f"Done in {self.seconds or 0:.1f}s: a grid of {len(self.compare.candidates)} candidates"
                    f"{where} (seed {self.seed}). {self.restored}").strip()
        return super().status_line(eta)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "kind": "compare", "grid": str(self.grid) if self.grid else None,
                "seed": self.seed, "done": self.done,
                "candidates": [{"index": i, "value": c.value, "label": c.label, "infotext": c.infotext,
                                "save_as": c.prepared.output.name}
                               for i, c in enumerate(self.compare.candidates)]}


def axis_values(axis: Any, values: Any) -> tuple[str, list[Any]]:
    """The axis and its values (a list, or a comma-separated string), each of the right kind; FieldErrors name
    `axis` or `values` and the item."""
    if axis not in AXES:
        raise FieldError("axis", f"'axis' must be one of {', '.join(AXES)}, got {shown(axis, 40)}.")
    items = [v.strip() for v in values.split(",")] if isinstance(values, str) else values
    if not isinstance(items, list):
        raise FieldError("values", f"'values' must be a list or a comma-separated string, got {shown(values, 40)}.")
    items = [v for v in items if not (isinstance(v, str) and not v)]
    if not items:
        raise FieldError("values", f"Give the {axis} values to compare, e.g. "
                                   + {"alpha": "0.2, 0.35, 0.5, 0.65, 0.8", "method": "rebasin, weighted_sum",
                                      "blocks": ", ".join(list(PRESETS)[:2])}[axis] + ".")
    if len(items) > MAX_CANDIDATES:
        raise FieldError("values", f"A compare grid takes at most {MAX_CANDIDATES} values, got {len(items)}; "
                                   "compare fewer at a time, or use the sweep to save one file per alpha.")
    out: list[Any] = []
    for i, v in enumerate(items, 1):
        where = f"value {i} of {len(items)}"
        if axis == "alpha":
            try:
                number = float(v) if isinstance(v, str) else v
            except ValueError:
                number = None
            if isinstance(number, bool) or not isinstance(number, (int, float)) or number != number:
                raise FieldError("values", f"alpha {where}: {shown(v, 40)} is not a number.")
            out.append(float(number))
        elif axis == "method":
            key = next((k for k, m in METHODS.items() if v in (k, m.label)), None)
            if key is None:
                raise FieldError("values", f"method {where}: {shown(v, 40)} is not a method; one of "
                                           f"{', '.join(METHODS)}.")
            out.append(key)
        else:
            if not isinstance(v, str) or v not in PRESETS:
                raise FieldError("values", f"block preset {where}: {shown(v, 40)} is not a preset; one of "
                                           f"{', '.join(PRESETS)}.")
            out.append(v)
    for i, v in enumerate(out):
        if v in out[:i]:
            raise FieldError("values", f"{axis} {shown(items[i], 40)} is listed twice; each cell needs its own value.")
    return axis, out


def _cell(axis: str, v: Any) -> str:
    if axis == "alpha":
        return f"alpha {alpha_label(v)}"
    if axis == "method":
        return str(METHODS[v].label)
    return f"blocks {v}"


def compare_request(body: Any) -> tuple[MergeRequest, str, list[Any], GenerationSettings]:
    """A compare body: the merge's fields plus `axis`, `values` and `generation` (txt2img's settings)."""
    if not isinstance(body, dict):
        raise FieldError("body", "The request body must be a JSON object.")
    axis, values = axis_values(body.get("axis", "alpha"), body.get("values", []))
    settings = GenerationSettings.from_dict(body.get("generation"))
    merge = {k: v for k, v in body.items() if k not in COMPARE_FIELDS}
    if axis == "alpha" and "alpha" in merge:
        merge.pop("alpha")
    req = MergeRequest.from_dict(merge)
    return req, axis, values, settings


def prepare_compare(service: MergeService, req: MergeRequest, axis: str, values: list[Any],
                    settings: GenerationSettings) -> PreparedCompare:
    """Every candidate checked as its single merge would be, and the grid's size, before anything runs."""
    if not service.host.loads_in_memory:
        raise RebasinError(NO_GENERATOR_COMPARE)
    check_grid(settings, len(values), available_memory())
    shared = FirstMatch() if axis != "method" else None  # alpha and block weights do not change the match
    candidates = []
    for v in values:
        one = replace(req, output_name="", **{axis: v})  # type: ignore[type-var]
        try:
            p = service.prepare(one, load=True)
        except FieldError as e:
            raise FieldError(e.field, f"{_cell(axis, v)}: {e}") from None
        except RebasinError as e:
            raise RebasinError(f"{_cell(axis, v)}: {e}") from None
        p.first = shared or FirstMatch()
        candidates.append(Candidate(_cell(axis, v), p, unsaved_label(p)))
    return PreparedCompare(req, axis, candidates, settings)


def submit_compare(service: MergeService, body: Any, job_id: str | None = None) -> CompareJob:
    """Check and start a compare grid job from an API body."""
    try:
        req, axis, values, settings = compare_request(body)
    except Exception:
        if job_id:
            service.host.discard_job(job_id)
        raise
    return start_compare(service, req, axis, values, settings, job_id)


def start_compare(service: MergeService, req: MergeRequest, axis: str, values: list[Any],
                  settings: GenerationSettings, job_id: str | None = None) -> CompareJob:
    """Check every candidate and the grid, then run the job (one job at a time, as every merge)."""
    from .compare_run import run_compare

    try:
        prepared = prepare_compare(service, req, axis, values, settings)
        job = service.register(CompareJob(job_id or new_job_id(), prepared))  # type: ignore[arg-type]
    except Exception:
        if job_id:
            service.host.discard_job(job_id)
        raise
    threading.Thread(target=run_compare, args=(service, job), name=f"rebasin-{job.id}", daemon=True).start()
    return job


def candidate_of(service: MergeService, job_id: str | None, index: Any) -> Candidate:
    """Candidate `index` of a finished compare grid (the latest one when `job_id` is None)."""
    jobs = [service.jobs.get(job_id)] if job_id else [j for j in reversed(service.jobs.values())
                                                      if isinstance(j, CompareJob)][:1]
    job = jobs[0] if jobs else None
    if not isinstance(job, CompareJob):
        raise RebasinError(f"No compare grid {shown(job_id, 60)}; make one first." if job_id else
                           "No compare grid yet; make one first.")
    if job.status != "done":
        raise RebasinError("The compare grid has not finished; load or save a candidate once it is done.")
    n = len(job.compare.candidates)
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < n:
        raise FieldError("index", f"'index' must be a candidate's number from 0 to {n - 1}, got {shown(index, 20)}.")
    return job.compare.candidates[index]


def load_candidate(service: MergeService, cand: Candidate, job_id: str | None = None) -> Job:
    """A "Merge & load (no file)" job for one candidate, reusing the grid's match; "Save this merge" then works."""
    return service.start(replace(cand.prepared, load=True, first=cand.prepared.first), job_id)


def save_candidate(service: MergeService, cand: Candidate, output_name: str = "", overwrite: bool = False,
                   job_id: str | None = None) -> Job:
    """A merge job that writes one candidate (the direct merge's bytes), reusing the grid's match."""
    p = cand.prepared
    req = replace(p.request, output_name=output_name or p.output.stem, overwrite=bool(overwrite))  # type: ignore[type-var]
    checked = service.prepare(req)
    return service.start(replace(checked, first=p.first), job_id)
