"""The merge form's events: model lists, method-dependent controls, the output name, Merge (and a reloaded page
following the running job), Stop, Load merged model."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ...errors import RebasinError
from ...methods import ALL_PARAMS
from ...options import MATCHINGS, OPTIONS
from .. import blocks_ui
from ..job import Job
from ..recipe_builder import NO_VAE
from ..request import MergeRequest
from ..service import MergeService
from . import controls
from .compat import JS_SELECT_CHECKPOINT, js_kwargs, js_start, keep, update
from .context import TabContext, method_key, method_of, part_keys
from .fields import Fields
from .layout import method_help
from .rendering import error_html, job_inputs, md_escape, progress_html, result_markdown

POLL_S = 0.5

MERGE_FIELDS = ("task_id", "model_a", "model_b", "model_c", "method", "alpha", "iterations", "parts", "device",
                "precision", "output_name", "overwrite", "tolerance", "blocks_on", "blocks_text",
                *(f"param_{name}" for name in ALL_PARAMS), "param_seed", "align", "bake_vae", "matching",
                "activation_samples", "repair", *controls.ADVANCED)

MODEL_DROPDOWNS = ("model_a", "model_b", "model_c")
# A job's frames: error, progress, result card, result path, Load button, the run button, then `keep` / the lists.
MERGE_OUTPUTS = ("error", "progress", "result", "result_path", "load", "merge", *MODEL_DROPDOWNS)
NAME_FIELDS = ("model_a", "model_b", "method", "alpha", "blocks_on", "blocks_preset")
ANALYSIS_FIELDS = ("method", "align", "matching", "repair")

Frame = tuple[Any, ...]


def same_choice(value: str | None, service: MergeService) -> str | None:
    """The current title of the checkpoint `value` named before a rescan (the host may have added " [hash]")."""
    if not value:
        return None
    try:
        return service.resolve(value, "Checkpoint").title
    except RebasinError:
        return None


def task_id_of(value: Any) -> str | None:
    """The WebUI task id javascript/rebasin.js gave the job, if it ran (not in the standalone app)."""
    return value if isinstance(value, str) and value.startswith("task(") else None


def request_from(v: dict[str, Any]) -> MergeRequest:
    """The merge the form describes. A control hidden for this method (analysis_visibility) keeps the value it
    had before: it is not used."""
    key = method_key(v["method"])
    extra: dict[str, Any] = {name: float(v[f"param_{name}"]) for name in ALL_PARAMS
                             if v[f"param_{name}"] is not None}
    extra["seed"] = int(v["param_seed"] or 0)
    extra["align"] = bool(v["align"]) and controls.can_align(method_of(key))
    if v["bake_vae"] and v["bake_vae"] != NO_VAE:
        extra["bake_vae"] = str(v["bake_vae"])
    extra.update({name: OPTIONS[name].kind(v[name]) for name in controls.ADVANCED if v[name] is not None})
    shown = controls.analysis_visibility(key, extra["align"], None, None)
    if v["matching"] in MATCHINGS:
        extra["matching"] = str(v["matching"]) if shown[0]["visible"] else MATCHINGS[0]
        extra["activation_samples"] = int(v["activation_samples"] or OPTIONS["activation_samples"].default)
    extra["repair"] = bool(v["repair"]) and shown[2]["visible"]
    return MergeRequest(model_a=v["model_a"] or "", model_b=v["model_b"] or "", model_c=v["model_c"], method=key,
                        alpha=float(v["alpha"]), iterations=int(v["iterations"]), parts=part_keys(v["parts"]),
                        device=v["device"] or "", precision=v["precision"] or "", output_name=v["output_name"] or "",
                        overwrite=bool(v["overwrite"]), tolerance=float(v["tolerance"] or 0) / 100,
                        blocks=blocks_ui.read_blocks(v["blocks_on"], v["blocks_text"], float(v["alpha"])), **extra)


def follow_job(job: Job, kept: list[Any], lists_after: Callable[[], list[Any]], eta: bool = True,
               named: bool = False) -> Iterator[Frame]:
    """Frames (error, progress, result, result_path, load, run button, *lists) until `job` ends.
    eta=False where the host draws its own progress bar with an ETA above ours: one ETA is enough.
    named=True: the status line names the job's models (a reloaded page's fields are empty)."""
    last: tuple[str, str] = ("", "")
    what = job_inputs(job.to_dict().get("request") or {}) if named else ""
    while True:
        done = job.wait(POLL_S)
        d = job.to_dict()
        state = d["status"] if done else "running"
        line = job.status_line(eta=eta)
        line = f"{what} · {line}" if what else line
        frame = (progress_html(d["fraction"], line, state), state)
        if frame != last:
            last = frame
            if not done:
                yield "", frame[0], "", keep(), update(interactive=False), update(interactive=False), *kept
        if done:
            break
    d = job.to_dict()
    if d["status"] == "done":
        request = d.get("request") or {}
        used = request.get("blocks")
        curve = blocks_ui.curve_html(used, request.get("blocks_preset") or "block weights used") if used else ""
        yield ("", last[0] + curve, result_markdown(d), d["output"], update(interactive=True),
               update(interactive=True), *lists_after())
    elif d["status"] == "failed":
        yield error_html(d["error"]), last[0], "", "", update(interactive=False), update(interactive=True), *kept
    else:
        yield "", last[0], "", "", update(interactive=False), update(interactive=True), *kept


def lists_after_save(ctx: TabContext, *values: str | None) -> list[Any]:
    """The model dropdowns after a save: the host rescanned its folders; each keeps the checkpoint it showed."""
    titles = ctx.titles()
    return [update(choices=titles, value=same_choice(v, ctx.service)) for v in values]


def shows_eta(ctx: TabContext, task_id: str | None) -> bool:
    """Whether our status line shows an ETA: not where the host draws its own bar (with one) for this job."""
    return not (task_id and ctx.host.shows_eta)


def wire_merge_events(ctx: TabContext, blocks: Any) -> None:
    c, host, service = ctx.c, ctx.host, ctx.service
    dropdowns = [c[k] for k in MODEL_DROPDOWNS]

    def refresh_lists(a: str | None, b: str | None, cc: str | None) -> list[Any]:
        host.refresh_checkpoints()
        return lists_after_save(ctx, a, b, cc)

    for key in "abc":
        c[f"refresh_{key}"].click(fn=refresh_lists, inputs=dropdowns, outputs=dropdowns)

    def refresh_vaes(current: str | None) -> Any:
        host.refresh_checkpoints()
        choices = ctx.vae_choices()
        return update(choices=choices, value=current if current in choices else NO_VAE)

    c["refresh_vae"].click(fn=refresh_vaes, inputs=[c["bake_vae"]], outputs=[c["bake_vae"]])

    param_controls = [c[f"param_{n}"] for n in ALL_PARAMS] + [c["param_seed"], c["align"]]

    def on_method(label: str) -> tuple[Any, ...]:
        info = method_of(label)
        return (update(visible=info.needs_c), update(visible=info.needs_c), method_help(info.name),
                *(update(**v) for v in controls.param_visibility(info.name)),
                *(update(**v) for v in controls.advanced_visibility(info.name)),
                update(visible=info.iterates), update(visible=info.aligns))

    # the iterations and tolerance sliders last (their visibility: MethodInfo.iterates, .aligns)
    c["method"].change(fn=on_method, inputs=[c["method"]],
                       outputs=[c["model_c"], c["refresh_c"], c["method_help"], *param_controls,
                                *(c[name] for name in controls.ADVANCED), c["iterations"], c["tolerance"]])
    blocks_ui.wire_block_events(c, update)

    analysis = Fields(c, ANALYSIS_FIELDS)

    def on_analysis(values: dict[Any, Any]) -> list[Any]:
        v = analysis.read(values)
        shown = controls.analysis_visibility(method_key(v["method"]), v["align"], v["matching"], v["repair"])
        return [update(**s) for s in shown]

    for name in ANALYSIS_FIELDS:
        c[name].change(fn=on_analysis, inputs=analysis.inputs,
                       outputs=[c["matching"], c["activation_samples"], c["repair"]])

    naming = Fields(c, NAME_FIELDS)

    def suggest_name(values: dict[Any, Any]) -> Any:
        """The output field's placeholder: the name an empty field gives (a preset's name, or "mbw")."""
        v = naming.read(values)
        stem = service.suggest_output_name(v["model_a"], v["model_b"], method_key(v["method"]),
                                           float(v["alpha"] or 0),
                                           blocks_ui.read_blocks(v["blocks_on"], v["blocks_preset"]))
        return update(placeholder=f"empty = {stem}" if stem else "empty = <A>_<B>_<method>_<alpha>[_<blocks>]")

    for name in NAME_FIELDS:
        c[name].change(fn=suggest_name, inputs=naming.inputs, outputs=[c["output_name"]])
    blocks_ui.wire_block_architecture(c, update, lambda a: blocks_ui.architecture_of_choice(service.resolve, a))

    form = Fields(c, MERGE_FIELDS)
    outputs = [c[k] for k in MERGE_OUTPUTS]

    def run_merge(values: dict[Any, Any]) -> Iterator[Frame]:
        v = form.read(values)
        tid = task_id_of(v["task_id"])
        kept = [keep(), keep(), keep()]
        try:
            job = service.submit(request_from(v), tid)
        except RebasinError as e:
            yield error_html(str(e)), "", keep(), keep(), keep(), update(interactive=True), *kept
            return
        # a task id means the JS hook attached the host's progress bar (requestProgress) to this job
        yield from follow_job(job, kept, lambda: lists_after_save(ctx, v["model_a"], v["model_b"], v["model_c"]),
                              eta=shows_eta(ctx, tid))

    c["merge_event"] = c["merge"].click(fn=run_merge, inputs=form.inputs, outputs=outputs, show_progress=False,
                                        **js_kwargs(js_start(form.position("task_id"))))

    def resume(a: str | None, b: str | None, cc: str | None) -> Iterator[Frame]:
        """A page (re)loaded while a merge or recipe runs follows that job to its end."""
        job = service.running()
        if job is None:
            yield tuple(keep() for _ in outputs)
            return
        yield from follow_job(job, [keep(), keep(), keep()], lambda: lists_after_save(ctx, a, b, cc), named=True)

    c["resume_event"] = blocks.load(fn=resume, inputs=dropdowns, outputs=outputs, show_progress=False)

    def stop() -> str:
        # The progress line says "Stopping..." while the job winds down and "Stopped" once it has: nothing
        # here that could outlive the job.
        job = service.cancel()
        return "Nothing is running." if job is None else job.too_late_to_cancel() or ""

    c["stop"].click(fn=stop, inputs=[], outputs=[c["load_status"]], queue=False)
    c["recipe_stop"].click(fn=stop, inputs=[], outputs=[c["load_status"]], queue=False)

    def do_load(path: str) -> tuple[str, str, str]:
        """(status, the host dropdown's value for the loaded model, the name for the page's selectCheckpoint)."""
        if not path:
            return "Merge a model first.", "", ""
        try:
            title = host.load_checkpoint(Path(path))
        except RebasinError as e:
            return f"Could not load: {e}", "", ""
        except Exception as e:
            return f"Could not load the merged model ({type(e).__name__}: {e}).", "", ""
        page = host.page_name_for(title)
        return f"Loaded **{md_escape(title)}** for txt2img and img2img.", title, page

    c["load_event"] = c["load"].click(fn=do_load, inputs=[c["result_path"]],
                                      outputs=[c["load_status"], c["loaded_title"], c["page_checkpoint"]])
    c["load_event"].then(fn=None, inputs=[c["page_checkpoint"]], outputs=[], **js_kwargs(JS_SELECT_CHECKPOINT))
