"""The tab's compare section: Compare (a grid over one axis, generated with txt2img's settings as they are), Stop,
then Load or Save one candidate; without a generator (the standalone app) the sweep, one file per alpha, instead."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from ...errors import RebasinError
from ...merge.sweep import parse_alphas
from ..compare import CompareJob, axis_values, candidate_of, load_candidate, save_candidate, start_compare
from ..generation import BY_NAME, GenerationSettings
from ..job import Job
from ..sweep_job import start_sweep
from .compat import JS_SELECT_CHECKPOINT, js_kwargs, js_start, keep, update
from .context import TabContext
from .fields import Fields
from .layout import AXIS_LABELS
from .merge_events import MERGE_FIELDS, POLL_S, request_from, shows_eta, task_id_of
from .rendering import error_html, md_escape, progress_html
from .unsaved_events import unsaved_markdown

GEN_PREFIX = "txt2img_"
# error, status, grid, candidate infotexts, candidate dropdown, Load, Save, Compare
OUTPUTS = ("compare_error", "compare_status", "compare_grid", "compare_info", "compare_pick", "compare_load",
           "compare_save", "compare_run")


def axis_key(label: Any) -> str:
    return next((k for k, v in AXIS_LABELS.items() if v == label), str(label))


def generation_values(v: dict[str, Any]) -> dict[str, Any]:
    """txt2img's component values as GenerationSettings fields (a seed typed in a textbox, sliders' floats)."""
    out: dict[str, Any] = {}
    for key, value in v.items():
        if not key.startswith(GEN_PREFIX) or value is None:
            continue
        name = key[len(GEN_PREFIX):]
        kind = BY_NAME[name].kind
        if kind is int and isinstance(value, str):
            value = value.strip() or "-1"
            with contextlib.suppress(ValueError):  # else from_dict names the field
                value = int(float(value))
        elif kind is int and isinstance(value, float) and value == int(value):
            value = int(value)
        elif kind is str and not isinstance(value, str):
            value = str(value)
        out[name] = value
    if out.get("hr_upscaler") == "None":
        out["hr_upscaler"] = ""
    return out


def candidate_choices(job: CompareJob) -> list[str]:
    return [f"{i + 1}: {c.value}" for i, c in enumerate(job.compare.candidates)]


def picked_index(choice: Any) -> int:
    try:
        return int(str(choice).split(":", 1)[0]) - 1
    except ValueError:
        raise RebasinError("Pick a candidate of the grid first.") from None


def infotexts_markdown(job: CompareJob) -> str:
    lines = [f"- **{md_escape(c.value)}**: `{c.infotext.replace('`', chr(39))}`" for c in job.compare.candidates
             if c.infotext]
    return "\n".join(lines)


def follow(job: Job, eta: bool) -> Iterator[tuple[bool, str]]:
    """(finished, progress HTML) while `job` runs, then once when it has ended."""
    last = ""
    while True:
        done = job.wait(POLL_S)
        d = job.to_dict()
        frame = progress_html(d["fraction"], job.status_line(eta=eta), d["status"] if done else "running")
        if done:
            yield True, frame
            return
        if frame != last:
            last = frame
            yield False, frame


def wire_compare_events(ctx: TabContext) -> None:
    c, host, service = ctx.c, ctx.host, ctx.service
    named = {**c, **{GEN_PREFIX + k: comp for k, comp in (host.txt2img_inputs() or {}).items() if k in BY_NAME}}
    form = Fields(named, (*MERGE_FIELDS, "compare_axis", "compare_values",
                          *(k for k in named if k.startswith(GEN_PREFIX))))
    outputs = [c[k] for k in OUTPUTS]
    busy = (update(interactive=False),) * 3

    def run(values: dict[Any, Any]) -> Iterator[tuple[Any, ...]]:
        v = form.read(values)
        tid = task_id_of(v["task_id"])
        try:
            axis, items = axis_values(axis_key(v["compare_axis"]), v["compare_values"] or "")
            settings = GenerationSettings.from_dict(generation_values(v))
            job = start_compare(service, request_from(v), axis, items, settings, tid)
        except RebasinError as e:
            if tid:
                host.discard_job(tid)
            yield (error_html(str(e), "Cannot compare"), "", keep(), keep(), keep(), keep(), keep(),
                   update(interactive=True))
            return
        for finished, frame in follow(job, shows_eta(ctx, tid)):
            if not finished:
                yield ("", frame, keep(), keep(), keep(), *busy)
                continue
            if job.status == "done":
                yield ("", frame, job.grid_image, infotexts_markdown(job),
                       update(choices=candidate_choices(job), value=candidate_choices(job)[0]),
                       update(interactive=True), update(interactive=True), update(interactive=True))
            else:
                err = error_html(job.error, "Compare failed") if job.status == "failed" else ""
                yield (err, frame, keep(), keep(), keep(), update(interactive=False), update(interactive=False),
                       update(interactive=True))

    hook = js_start(form.position("task_id"), "rebasin_compare_progress_anchor")
    c["compare_event"] = c["compare_run"].click(fn=run, inputs=form.inputs, outputs=outputs, show_progress=False,
                                                **js_kwargs(hook))

    def stop() -> str:
        job = service.cancel()
        return "" if job is None else progress_html(job.fraction, job.status_line(), "running")

    c["compare_stop"].click(fn=stop, inputs=[], outputs=[c["compare_status"]], queue=False)

    def load(choice: Any) -> Iterator[tuple[Any, ...]]:
        """(status, unsaved status, Save this merge, loaded title, page name)."""
        try:
            job = load_candidate(service, candidate_of(service, None, picked_index(choice)))
        except RebasinError as e:
            yield error_html(str(e), "Cannot load"), keep(), keep(), keep(), keep()
            return
        for finished, frame in follow(job, True):
            if not finished:
                yield frame, keep(), keep(), keep(), keep()
        cur = service.unsaved.current
        if job.status == "done" and cur is not None:
            yield (frame, unsaved_markdown(cur), update(interactive=True), cur.title, host.page_name_for(cur.title))
        else:
            yield (error_html(job.error, "Cannot load") if job.error else frame), keep(), keep(), keep(), keep()

    event = c["compare_load"].click(fn=load, inputs=[c["compare_pick"]], show_progress=False,
                                    outputs=[c["compare_status"], c["unsaved_status"], c["save_unsaved"],
                                             c["loaded_title"], c["page_checkpoint"]])
    event.then(fn=None, inputs=[c["page_checkpoint"]], outputs=[], **js_kwargs(JS_SELECT_CHECKPOINT))

    def save(choice: Any, name: str, overwrite: bool) -> Iterator[str]:
        try:
            cand = candidate_of(service, None, picked_index(choice))
            job = save_candidate(service, cand, name or "", bool(overwrite))
        except RebasinError as e:
            yield error_html(str(e), "Cannot save")
            return
        for finished, frame in follow(job, True):
            if finished and job.status == "failed":
                yield error_html(job.error, "Cannot save")
            else:
                yield frame

    c["compare_save"].click(fn=save, inputs=[c["compare_pick"], c["compare_save_name"], c["overwrite"]],
                            outputs=[c["compare_status"]], show_progress=False)

    sweep_form = Fields(c, (*MERGE_FIELDS, "compare_values"))

    def sweep(values: dict[Any, Any]) -> Iterator[tuple[str, str]]:
        """Without a generator: one file per alpha value, named as Merge names each (or by the {alpha} template)."""
        v = sweep_form.read(values)
        try:
            alphas = parse_alphas(v["compare_values"] or "")
            job = start_sweep(service, request_from(v), alphas)
        except RebasinError as e:
            yield error_html(str(e), "Cannot sweep"), ""
            return
        for finished, frame in follow(job, True):
            yield (error_html(job.error, "Sweep failed") if finished and job.status == "failed" else ""), frame

    c["compare_sweep"].click(fn=sweep, inputs=sweep_form.inputs, outputs=[c["compare_error"], c["compare_status"]],
                             show_progress=False)
