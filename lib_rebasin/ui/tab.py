"""The Re-Basin tab as a gradio Blocks, built against a `Host`.

Only the gradio subset that runs on both 3.41 (A1111, reForge, SD.Next) and 4.x (Forge): `gr.update`, the JS
hook passed as `_js=` on 3.x and `js=` on 4.x, no `.style()`, no `gr.Box`, no layout `scale`. gradio is
imported inside `build_tab` only.
"""

from __future__ import annotations

import html
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import RebasinError
from ..links import MERGE_QUALITY
from .host import HIRES_ADVICE, HIRES_ELEM_IDS, HIRES_PRESETS, Host, HiresPreset, hires_values, known_downloads
from . import blocks_ui as bui
from . import recipe_builder as rb
from .service import (PART_LABELS, PARTS, PRECISION_CHOICES, MergeRequest, MergeService, RecipeRequest, format_eta,
                      method_table)

POLL_S = 0.5

# Same text as the extension's root style.css (the WebUI loads that file; the standalone app passes this).
TAB_CSS = """/* Re-Basin extension. Everything is scoped to the tab's ids and rebasin- classes. */
#rebasin_error .rebasin-error {
    border: 1px solid #d9534f;
    background: rgba(217, 83, 79, 0.12);
    color: inherit;
    padding: 0.6em 0.8em;
    border-radius: 6px;
}
.rebasin-progress { margin: 0.4em 0; }
.rebasin-bar {
    height: 14px;
    border-radius: 7px;
    background: rgba(127, 127, 127, 0.25);
    overflow: hidden;
}
.rebasin-bar-fill {
    height: 100%;
    background: linear-gradient(90deg, #ff7c00, #ffb300);
    transition: width 0.3s ease;
}
.rebasin-done .rebasin-bar-fill { background: #2e9e44; }
.rebasin-cancelled .rebasin-bar-fill, .rebasin-failed .rebasin-bar-fill { background: #999; }
.rebasin-status-line { margin-top: 0.3em; font-family: monospace; font-size: 0.9em; }
.rebasin-model-row { align-items: flex-end; }
.rebasin-tool { max-width: 2.6em; min-width: 2.6em !important; }
#rebasin_hires { padding: 0.6em; }
#rebasin_hires_advice { opacity: 0.9; font-size: 0.95em; }
#rebasin_recipe_step_buttons button { white-space: nowrap; min-width: max-content; }
"""

# JS hooks. Each is inline and guarded, so the tab works where javascript/rebasin.js is not loaded (standalone).
JS_START = ("(...args) => { if (typeof rebasin_start_merge === 'function') { return rebasin_start_merge(...args); }"
            " return args; }")
JS_SELECT_CHECKPOINT = ("(title) => { if (title && typeof selectCheckpoint === 'function') { selectCheckpoint(title); }"
                        " return []; }")
JS_SWITCH_TXT2IMG = ("() => { if (typeof rebasin_switch_to_txt2img === 'function') { rebasin_switch_to_txt2img(); }"
                     " return []; }")


# Which settings a method reads (the core's MethodInfo has no such flags): the tab hides the others.
USES_ITERATIONS = ("rebasin", "legacy")
USES_TOLERANCE = ("rebasin",)
# Labels of MergeOptions.matching's values, in the tab.
MATCHING_CHOICES = ("weights", "activations")

# Components whose first value comes from Settings -> Re-Basin. The WebUI's ui-config.json would pin the value they
# had on the first start (modules/ui_loadsave.py) and override Settings forever after; the host skips components
# that carry this attribute.
NOT_IN_UI_CONFIG = "do_not_save_to_config"


def gradio_major() -> int:
    import gradio as gr

    return int(str(gr.__version__).split(".")[0])


def js_kwargs(js: str) -> dict[str, str]:
    """The client-side hook keyword for this gradio: `_js` on 3.x, `js` on 4.x."""
    return {"js": js} if gradio_major() >= 4 else {"_js": js}


def update(**kw: Any) -> Any:
    import gradio as gr

    return gr.update(**kw)


@dataclass
class TabUI:
    """The built tab plus the components a host adapter may wire to its own UI later."""

    blocks: Any
    components: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.components[key]


# -- rendering helpers (plain functions, unit-tested without a browser) ------------------------------------------

def error_html(message: str | None, title: str = "Cannot merge") -> str:
    if not message:
        return ""
    return f'<div class="rebasin-error" role="alert"><b>{html.escape(title)}:</b> {html.escape(message)}</div>'


def progress_html(fraction: float, line: str, state: str = "running") -> str:
    pct = max(0.0, min(1.0, fraction)) * 100
    return (f'<div class="rebasin-progress rebasin-{state}" data-state="{state}">'
            f'<div class="rebasin-bar"><div class="rebasin-bar-fill" style="width:{pct:.1f}%"></div></div>'
            f'<div class="rebasin-status-line">{html.escape(line)}</div></div>')


def md_escape(text: str) -> str:
    """Plain text for a gr.Markdown: `(1-alpha)*A + alpha*B` must not turn into italics."""
    out = []
    for ch in str(text):
        out.append("\\" + ch if ch in "\\`*_{}[]<>#|~" else ch)
    return "".join(out)


def result_markdown(job_dict: dict[str, Any]) -> str:
    if job_dict.get("status") != "done":
        return ""
    lines = [f"### Merged: `{job_dict.get('output_name')}`",
             f"Saved to `{job_dict.get('output')}` in {job_dict.get('seconds') or 0:.1f} s.", ""]
    summary = job_dict.get("summary") or []
    if summary:
        lines.append("**What the merge did**")
        lines.extend(f"- {md_escape(s)}" for s in summary)
        lines += ["", f"Which method keeps what, measured on trained models: `{MERGE_QUALITY}` in the Re-Basin "
                      f"extension's folder."]
    return "\n".join(lines)


def job_inputs(request: dict[str, Any]) -> str:
    """What a job merges, for a page that did not start it (reloaded: its Model A / B fields are empty)."""
    if "recipe" in request:
        models = list(dict.fromkeys((request.get("models") or {}).values()))
        return f"Recipe {request.get('recipe')}" + (f" ({', '.join(models)})" if models else "")
    names = [f"{k} {request.get(f'model_{k.lower()}')}" for k in "ABC" if request.get(f"model_{k.lower()}")]
    return ", ".join(names)


def same_choice(value: str | None, service: MergeService) -> str | None:
    """The current title of the checkpoint `value` named before a rescan (the host may have added " [hash]")."""
    if not value:
        return None
    try:
        return service.resolve(value, "Checkpoint").title
    except RebasinError:
        return None


def preset_updates(preset: HiresPreset, targets: dict[str, Any], current_upscaler: str | None,
                   ready: set[str] | None = None) -> list[Any]:
    """gr.update values for the captured txt2img components, in HIRES_ELEM_IDS order (present ones only)."""
    up = targets.get("upscaler")
    values = hires_values(preset, getattr(up, "choices", None), current_upscaler, ready)
    out = []
    for key in HIRES_ELEM_IDS:
        if key in targets:
            v = values[key]
            out.append(update() if v is None else update(value=v))
    return out


def preset_summary(preset: HiresPreset, targets: dict[str, Any], current_upscaler: str | None,
                   where: str, ready: set[str] | None = None) -> str:
    up = targets.get("upscaler")
    values = hires_values(preset, getattr(up, "choices", None), current_upscaler, ready)
    upscaler = values["upscaler"] or "the current upscaler"
    why = ""
    if values["upscaler"] and ready is not None:
        skipped = known_downloads(getattr(up, "choices", None), ready, values["upscaler"])
        why = " (installed, nothing to download" + (f"; {' and '.join(skipped)} would need a download first"
                                                    if skipped else "") + ")"
    return (f"**{preset.label}** {where}: hires fix on, denoising strength {preset.denoise:.2f}, upscale "
            f"x{preset.scale:g}, upscaler **{md_escape(upscaler)}**{md_escape(why)}, hires steps "
            f"{preset.steps or 'same as first pass'} ({preset.note}). Your prompt is unchanged.")


def build_tab(host: Host, service: MergeService | None = None, *, title: str = "Re-Basin",
              css: str | None = None) -> TabUI:
    import gradio as gr

    service = service or MergeService(host)
    methods = method_table()
    method_keys = list(methods)
    method_label = {k: getattr(m, "label", k) for k, m in methods.items()}
    label_to_method = {v: k for k, v in method_label.items()}
    part_label_to_key = {v: k for k, v in PART_LABELS.items()}
    defaults = host.defaults()
    d_method = defaults.get("method") if defaults.get("method") in methods else method_keys[0]
    devices = host.device_choices()
    d_device = defaults.get("device") if defaults.get("device") in devices else host.default_device()
    d_precision = defaults.get("precision") if defaults.get("precision") in PRECISION_CHOICES else "fp16"
    d_iterations = int(defaults.get("iterations") or 1)
    d_alpha = float(defaults.get("alpha", 0.5))
    d_tolerance = 100 * float(defaults.get("tolerance", MergeRequest.tolerance))
    titles = service.titles()
    targets = dict(host.hires_targets() or {})
    c: dict[str, Any] = {}

    def method_help(key: str) -> str:
        m = methods.get(key)
        return md_escape(getattr(m, "help", "")) if m is not None else ""

    blocks_kw = {"css": css} if css else {}
    with gr.Blocks(analytics_enabled=False, title=title, **blocks_kw) as blocks:
        with gr.Row(elem_id="rebasin_main_row"):
            with gr.Column(elem_id="rebasin_inputs"):
                gr.HTML(f"<h2 class='rebasin-title'>{html.escape(title)} merge</h2>"
                        "<p class='rebasin-lead'>Align model B's neurons to model A (weight matching), then "
                        "interpolate. The result is saved as a new checkpoint.</p>")
                for key, label in (("a", "Model A"), ("b", "Model B"), ("c", "Model C (the base B was tuned from; add difference, train difference, TIES, DARE)")):
                    with gr.Row(elem_id=f"rebasin_model_{key}_row", elem_classes=["rebasin-model-row"]):
                        c[f"model_{key}"] = gr.Dropdown(
                            choices=titles, value=None, label=label, elem_id=f"rebasin_model_{key}",
                            visible=(key != "c" or getattr(methods.get(d_method), "needs_c", False)))
                        c[f"refresh_{key}"] = gr.Button(
                            "\u21bb", elem_id=f"rebasin_refresh_{key}", elem_classes=["tool", "rebasin-tool"],
                            visible=(key != "c" or getattr(methods.get(d_method), "needs_c", False)))
                c["method"] = gr.Radio(choices=[method_label[k] for k in method_keys], value=method_label[d_method],
                                       label="Method", elem_id="rebasin_method")
                c["method_help"] = gr.Markdown(method_help(d_method), elem_id="rebasin_method_help")
                c["alpha"] = gr.Slider(minimum=0.0, maximum=1.0, step=0.01, value=d_alpha,
                                       label="Alpha (0 = model A, 1 = model B)", elem_id="rebasin_alpha")
                bui.build_param_controls(gr, c, d_method)
                bui.build_block_controls(gr, c, d_alpha)
                with gr.Row():
                    c["iterations"] = gr.Slider(minimum=1, maximum=500, step=1, value=d_iterations,
                                                label="Iterations", elem_id="rebasin_iterations",
                                                visible=d_method in USES_ITERATIONS)
                    c["parts"] = gr.CheckboxGroup(choices=[PART_LABELS[p] for p in PARTS],
                                                  value=[PART_LABELS[p] for p in PARTS], label="Parts to merge",
                                                  elem_id="rebasin_parts")
                c["tolerance"] = gr.Slider(
                    minimum=0.0, maximum=10.0, step=0.1, value=d_tolerance,
                    label="Re-basin: stop matching when a sweep adds less than this % of the first sweep's gain "
                          "(0 = until nothing improves; much slower on unrelated models)",
                    elem_id="rebasin_tolerance", visible=d_method in USES_TOLERANCE)
                shown = bui.analysis_visibility(d_method, False, MATCHING_CHOICES[0], False)
                with gr.Row(elem_id="rebasin_matching_row"):
                    c["matching"] = gr.Radio(choices=list(MATCHING_CHOICES), value=MATCHING_CHOICES[0],
                                             label="Re-basin matching (re-basin, or another method with 'align'): "
                                                   "by weights, or by activations on seeded prompts (slower)",
                                             elem_id="rebasin_matching", **shown[0])
                    c["activation_samples"] = gr.Slider(minimum=1, maximum=64, step=1,
                                                        value=MergeRequest.activation_samples,
                                                        label="Activation matching / REPAIR: prompts",
                                                        elem_id="rebasin_activation_samples", **shown[1])
                    c["repair"] = gr.Checkbox(value=False, label="REPAIR: restore the parents' activation statistics "
                                                                 "after blending", elem_id="rebasin_repair",
                                              **shown[2])
                with gr.Row():
                    c["device"] = gr.Dropdown(choices=devices, value=d_device, label="Device",
                                              elem_id="rebasin_device")
                    c["precision"] = gr.Radio(choices=list(PRECISION_CHOICES), value=d_precision,
                                              label="Save precision", elem_id="rebasin_precision")
                with gr.Row(elem_classes=["rebasin-model-row"]):
                    c["bake_vae"] = gr.Dropdown(choices=["None", *service.vae_titles(), *titles], value="None",
                                                label="Bake in VAE (a file from the VAE folder, or a checkpoint's "
                                                      "VAE; replaces the merged VAE)", elem_id="rebasin_bake_vae")
                    c["refresh_vae"] = gr.Button("\u21bb", elem_id="rebasin_refresh_vae",
                                                 elem_classes=["tool", "rebasin-tool"])
                with gr.Row():
                    c["output_name"] = gr.Textbox(label="Output name (saved as .safetensors in the checkpoint folder)",
                                                  placeholder="empty = <A>_<B>_<method>_<alpha>",
                                                  elem_id="rebasin_output_name", max_lines=1)
                    c["overwrite"] = gr.Checkbox(value=False, label="Overwrite if it exists",
                                                 elem_id="rebasin_overwrite")
                with gr.Row(elem_id="rebasin_buttons"):
                    c["merge"] = gr.Button("Merge", variant="primary", elem_id="rebasin_merge")
                    c["stop"] = gr.Button("Stop", elem_id="rebasin_stop")
                c["task_id"] = gr.Textbox(value="", visible=False, elem_id="rebasin_task_id")
                with gr.Accordion("Recipe: a chain of merges in one run", open=False, elem_id="rebasin_recipe"):
                    _recipe_components(gr, c, titles, [method_label[k] for k in method_keys], method_label[d_method],
                                       devices, d_device, d_precision, d_alpha, d_iterations,
                                       bool(getattr(methods.get(d_method), "needs_c", False)), d_method,
                                       service.vae_titles())
            with gr.Column(elem_id="rebasin_outputs"):
                c["error"] = gr.HTML("", elem_id="rebasin_error")
                c["progress_anchor"] = gr.HTML("", elem_id="rebasin_progress_anchor")
                c["progress"] = gr.HTML("", elem_id="rebasin_progress")
                c["result"] = gr.Markdown("", elem_id="rebasin_result")
                c["result_path"] = gr.Textbox(value="", visible=False, elem_id="rebasin_result_path")
                with gr.Row():
                    c["load"] = gr.Button("Load merged model", elem_id="rebasin_load", interactive=False)
                c["load_status"] = gr.Markdown("", elem_id="rebasin_load_status")
                c["loaded_title"] = gr.Textbox(value="", visible=False, elem_id="rebasin_loaded_title")
                # the name for the page's selectCheckpoint(), "" where the host adapter shows the model itself
                c["page_checkpoint"] = gr.Textbox(value="", visible=False, elem_id="rebasin_page_checkpoint")
                with gr.Group(elem_id="rebasin_hires"):
                    gr.HTML("<h3 class='rebasin-subtitle'>Generate with hires fix</h3>")
                    with gr.Row(elem_id="rebasin_hires_buttons"):
                        for p in HIRES_PRESETS:
                            c[f"preset_{p.key}"] = gr.Button(p.label, elem_id=f"rebasin_preset_{p.key}")
                    c["hires_advice"] = gr.Markdown(HIRES_ADVICE, elem_id="rebasin_hires_advice")
                    c["preset_note"] = gr.Markdown("", elem_id="rebasin_preset_note")

        # -- events -------------------------------------------------------------------------------------------
        dropdowns = [c["model_a"], c["model_b"], c["model_c"]]

        def refresh_lists(a: str | None, b: str | None, cc: str | None):
            host.refresh_checkpoints()
            t = service.titles()
            return [update(choices=t, value=same_choice(v, service)) for v in (a, b, cc)]

        for key in "abc":
            c[f"refresh_{key}"].click(fn=refresh_lists, inputs=dropdowns, outputs=dropdowns)

        def refresh_vaes(current: str | None):
            host.refresh_checkpoints()
            choices = ["None", *service.vae_titles(), *service.titles()]
            return update(choices=choices, value=current if current in choices else "None")

        c["refresh_vae"].click(fn=refresh_vaes, inputs=[c["bake_vae"]], outputs=[c["bake_vae"]])

        param_controls = [c[f"param_{n}"] for n in bui.ALL_PARAMS] + [c["param_seed"], c["align"]]

        def on_method(label: str):
            key = label_to_method.get(label, label)
            needs_c = bool(getattr(methods.get(key), "needs_c", False))
            return (update(visible=needs_c), update(visible=needs_c), method_help(key),
                    *(update(**v) for v in bui.param_visibility(key)),
                    update(visible=key in USES_ITERATIONS), update(visible=key in USES_TOLERANCE))

        c["method"].change(fn=on_method, inputs=[c["method"]],
                           outputs=[c["model_c"], c["refresh_c"], c["method_help"], *param_controls, c["iterations"],
                                    c["tolerance"]])
        bui.wire_block_events(c, update)

        analysis_inputs = [c["method"], c["align"], c["matching"], c["repair"]]

        def on_analysis(label: str, align: bool, matching: str, repair: bool):
            key = label_to_method.get(label, label)
            return [update(**v) for v in bui.analysis_visibility(key, align, matching, repair)]

        for comp in analysis_inputs:
            comp.change(fn=on_analysis, inputs=analysis_inputs,
                        outputs=[c["matching"], c["activation_samples"], c["repair"]])

        def suggest_name(a, b, method, alpha, use_blocks, preset):
            """The output field's placeholder: the name an empty field gives (a preset's name, or "mbw")."""
            key = label_to_method.get(method, method)
            stem = service.suggest_output_name(a, b, key, float(alpha or 0), bui.read_blocks(use_blocks, preset))
            return update(placeholder=f"empty = {stem}" if stem else "empty = <A>_<B>_<method>_<alpha>[_<blocks>]")

        name_inputs = [c["model_a"], c["model_b"], c["method"], c["alpha"], c["blocks_on"], c["blocks_preset"]]
        for comp in name_inputs:
            comp.change(fn=suggest_name, inputs=name_inputs, outputs=[c["output_name"]])

        merge_inputs = [c["task_id"], c["model_a"], c["model_b"], c["model_c"], c["method"], c["alpha"],
                        c["iterations"], c["parts"], c["device"], c["precision"], c["output_name"], c["overwrite"],
                        c["tolerance"], c["blocks_on"], c["blocks_text"], *param_controls, c["bake_vae"],
                        c["matching"], c["activation_samples"], c["repair"]]
        merge_outputs = [c["error"], c["progress"], c["result"], c["result_path"], c["load"], c["merge"], *dropdowns]

        def lists_after_save(a, b, cc):
            t = service.titles()  # the host rescanned its folders after the save
            return [update(choices=t, value=same_choice(v, service)) for v in (a, b, cc)]

        def run_merge(task_id, a, b, cc, method, alpha, iterations, parts, device, precision, name, overwrite,
                      tolerance=100 * MergeRequest.tolerance, use_blocks=False, blocks_text="", *params):
            key = label_to_method.get(method, method)
            extra: dict[str, Any] = {}
            if params:  # method parameters in ALL_PARAMS order, then seed, align, VAE to bake in, matching, REPAIR
                n = len(bui.ALL_PARAMS)
                extra = {name: float(v) for name, v in zip(bui.ALL_PARAMS, params) if v is not None}
                if len(params) > n:
                    extra["seed"] = int(params[n] or 0)
                if len(params) > n + 1:
                    extra["align"] = bool(params[n + 1]) and bui._can_align(key)
                if len(params) > n + 2 and params[n + 2] and params[n + 2] != "None":
                    extra["bake_vae"] = str(params[n + 2])
                # a control hidden for this method (analysis_visibility) keeps the value it had before: not used
                shown = bui.analysis_visibility(key, extra.get("align", False), None, None)
                if len(params) > n + 4 and params[n + 3] in MATCHING_CHOICES:
                    extra["matching"] = str(params[n + 3]) if shown[0]["visible"] else MATCHING_CHOICES[0]
                    extra["activation_samples"] = int(params[n + 4] or MergeRequest.activation_samples)
                if len(params) > n + 5:
                    extra["repair"] = bool(params[n + 5]) and shown[2]["visible"]
            req = MergeRequest(model_a=a or "", model_b=b or "", model_c=cc, method=key, alpha=float(alpha),
                               iterations=int(iterations), parts=tuple(part_label_to_key.get(p, p) for p in parts or []),
                               device=device or "", precision=precision or "", output_name=name or "",
                               overwrite=bool(overwrite), tolerance=float(tolerance or 0) / 100,
                               blocks=bui.read_blocks(use_blocks, blocks_text, float(alpha)), **extra)
            tid = task_id if isinstance(task_id, str) and task_id.startswith("task(") else None
            keep = [update(), update(), update()]
            try:
                job = service.submit(req, tid)
            except RebasinError as e:
                yield (error_html(str(e)), "", update(), update(), update(), update(interactive=True), *keep)
                return
            # a task id means the JS hook attached the host's progress bar (requestProgress) to this job
            yield from follow_job(job, keep, lambda: lists_after_save(a, b, cc),
                                  eta=not (tid and getattr(host, "shows_eta", False)))

        def follow_job(job, keep, lists_after, eta=True, named=False):
            """Frames (error, progress, result, result_path, load, run button, *lists) until `job` ends.
            eta=False where the host draws its own progress bar with an ETA above ours: one ETA is enough.
            named=True: the status line names the job's models (a reloaded page's fields are empty)."""
            last = None
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
                        yield ("", frame[0], "", update(), update(interactive=False), update(interactive=False),
                               *keep)
                if done:
                    break
            d = job.to_dict()
            if d["status"] == "done":
                blocks_used = (d.get("request") or {}).get("blocks")
                curve = bui.curve_html(blocks_used, (d.get("request") or {}).get("blocks_preset") or
                                       "block weights used") if blocks_used else ""
                yield ("", last[0] + curve, result_markdown(d), d["output"], update(interactive=True),
                       update(interactive=True), *lists_after())
            elif d["status"] == "failed":
                yield (error_html(d["error"]), last[0], "", "", update(interactive=False), update(interactive=True),
                       *keep)
            else:
                yield "", last[0], "", "", update(interactive=False), update(interactive=True), *keep

        c["merge_event"] = c["merge"].click(fn=run_merge, inputs=merge_inputs, outputs=merge_outputs,
                                            show_progress=False, **js_kwargs(JS_START))

        def resume(a, b, cc):
            """A page (re)loaded while a merge or recipe runs follows that job to its end."""
            job = service.running()
            if job is None:
                yield tuple(update() for _ in merge_outputs)
                return
            yield from follow_job(job, [update(), update(), update()], lambda: lists_after_save(a, b, cc),
                                  named=True)

        c["resume_event"] = blocks.load(fn=resume, inputs=dropdowns, outputs=merge_outputs, show_progress=False)

        def stop():
            # The progress line says "Stopping..." while the job winds down and "Stopped" once it has: nothing
            # here that could outlive the job.
            job = service.cancel()
            return "Nothing is running." if job is None else job.too_late_to_cancel() or ""

        c["stop"].click(fn=stop, inputs=[], outputs=[c["load_status"]], queue=False)
        c["recipe_stop"].click(fn=stop, inputs=[], outputs=[c["load_status"]], queue=False)

        def do_load(path: str):
            """(status, the host dropdown's value for the loaded model, the name for the page's selectCheckpoint)."""
            if not path:
                return "Merge a model first.", "", ""
            try:
                title = host.load_checkpoint(Path(path))
            except RebasinError as e:
                return f"Could not load: {e}", "", ""
            except Exception as e:  # the host's loader failed: say so in one line
                return f"Could not load the merged model ({type(e).__name__}: {e}).", "", ""
            page = title if getattr(host, "page_selects_checkpoint", False) else ""
            return f"Loaded **{md_escape(title)}** for txt2img and img2img.", title, page

        c["load_event"] = c["load"].click(fn=do_load, inputs=[c["result_path"]],
                                          outputs=[c["load_status"], c["loaded_title"], c["page_checkpoint"]])
        c["load_event"].then(fn=None, inputs=[c["page_checkpoint"]], outputs=[], **js_kwargs(JS_SELECT_CHECKPOINT))

        _recipe_events(c, host, service, label_to_method, part_label_to_key, dropdowns, follow_job,
                       lists_after_save)

        target_keys = [k for k in HIRES_ELEM_IDS if k in targets]
        where = "set in txt2img" if target_keys else "(no txt2img here; these are the values to use)"
        for p in HIRES_PRESETS:
            btn = c[f"preset_{p.key}"]
            if target_keys:
                def apply(current=None, _p=p):
                    ready = host.ready_upscalers()  # asked per click: the user may have installed one since
                    return [*preset_updates(_p, targets, current, ready),
                            preset_summary(_p, targets, current, where, ready)]

                up = [targets["upscaler"]] if "upscaler" in targets else []
                ev = btn.click(fn=apply, inputs=up, outputs=[targets[k] for k in target_keys] + [c["preset_note"]])
                ev.then(fn=None, inputs=[], outputs=[], **js_kwargs(JS_SWITCH_TXT2IMG))
            else:
                js = (f"() => {{ if (typeof rebasin_apply_hires === 'function') {{ rebasin_apply_hires({p.denoise}, "
                      f"{p.scale}, {p.steps}); }} return []; }}")
                btn.click(fn=lambda _p=p: preset_summary(_p, targets, None, where), inputs=[],
                          outputs=[c["preset_note"]], **js_kwargs(js))

    for key in ("method", "iterations", "device", "precision", "tolerance", "recipe_method", "recipe_iterations",
                "recipe_device", "recipe_precision"):
        setattr(c[key], NOT_IN_UI_CONFIG, True)
    return TabUI(blocks, c)


# -- the recipe section --------------------------------------------------------------------------------------------

RECIPE_HELP = ("Build a chain of merges (like DunkMash: several re-basin merges, then an add difference) and run it "
               "in one go; only the last step is saved, with the full recipe in its metadata. A step's A/B/C are "
               "installed checkpoints or **earlier steps** (`[step] name`). The text box is the recipe itself: "
               "edit it and press **Apply text**, or use the buttons.")


def _recipe_components(gr: Any, c: dict[str, Any], titles: list[str], method_labels: list[str], d_method: str,
                       devices: list[str], d_device: str, d_precision: str, d_alpha: float, d_iterations: int,
                       needs_c: bool, d_method_key: str = "rebasin", vae_titles: list[str] = ()) -> None:
    c["recipe_help"] = gr.Markdown(RECIPE_HELP, elem_id="rebasin_recipe_help")
    c["recipe_error"] = gr.HTML("", elem_id="rebasin_recipe_error")
    c["recipe_overview"] = gr.Markdown(rb.recipe_markdown(""), elem_id="rebasin_recipe_overview")
    with gr.Row():
        c["recipe_name"] = gr.Textbox(value="my_recipe", label="Recipe name", max_lines=1,
                                      elem_id="rebasin_recipe_name")
        c["recipe_seed"] = gr.Number(value=0, precision=0, label="Seed", elem_id="rebasin_recipe_seed")
    with gr.Row():
        c["recipe_device"] = gr.Dropdown(choices=devices, value=d_device, label="Device (all steps)",
                                         elem_id="rebasin_recipe_device")
        c["recipe_precision"] = gr.Radio(choices=list(PRECISION_CHOICES), value=d_precision,
                                         label="Precision (all steps)", elem_id="rebasin_recipe_precision")
    with gr.Row(elem_classes=["rebasin-model-row"]):
        c["recipe_bake_vae"] = gr.Dropdown(choices=[rb.NO_VAE, *vae_titles, *titles], value=rb.NO_VAE,
                                           label="Bake in VAE (the output's VAE: a VAE file, or a checkpoint's)",
                                           elem_id="rebasin_recipe_bake_vae")
    gr.HTML("<h4 class='rebasin-subtitle'>Step</h4>")
    with gr.Row():
        c["recipe_step"] = gr.Dropdown(choices=[], value=None, label="Step to edit, move or remove",
                                       elem_id="rebasin_recipe_step")
        c["recipe_step_name"] = gr.Textbox(value="", label="Step name (empty = automatic)", max_lines=1,
                                           elem_id="rebasin_recipe_step_name")
    c["recipe_method"] = gr.Radio(choices=method_labels, value=d_method, label="Method",
                                  elem_id="rebasin_recipe_method")
    for key in "abc":
        with gr.Row(elem_classes=["rebasin-model-row"]):
            c[f"recipe_{key}"] = gr.Dropdown(choices=list(titles), value=None, label=f"Model {key.upper()}",
                                             elem_id=f"rebasin_recipe_{key}", visible=(key != "c" or needs_c))
    with gr.Row():
        c["recipe_alpha"] = gr.Slider(minimum=0.0, maximum=1.0, step=0.01, value=d_alpha, label="Alpha",
                                      elem_id="rebasin_recipe_alpha")
        c["recipe_iterations"] = gr.Slider(minimum=1, maximum=1000, step=1, value=d_iterations, label="Iterations",
                                           elem_id="rebasin_recipe_iterations",
                                           visible=d_method_key in USES_ITERATIONS)
    c["recipe_parts"] = gr.CheckboxGroup(choices=[PART_LABELS[p] for p in PARTS],
                                         value=[PART_LABELS[p] for p in PARTS], label="Parts",
                                         elem_id="rebasin_recipe_parts")
    with gr.Row(elem_id="rebasin_recipe_step_buttons"):
        c["recipe_add"] = gr.Button("Add step", variant="primary", elem_id="rebasin_recipe_add")
        c["recipe_update"] = gr.Button("Update step", elem_id="rebasin_recipe_update")
        c["recipe_remove"] = gr.Button("Remove step", elem_id="rebasin_recipe_remove")
        c["recipe_up"] = gr.Button("\u2191 Up", elem_id="rebasin_recipe_up")
        c["recipe_down"] = gr.Button("\u2193 Down", elem_id="rebasin_recipe_down")
        c["recipe_refresh"] = gr.Button("\u21bb", elem_id="rebasin_recipe_refresh", elem_classes=["tool", "rebasin-tool"])
    c["recipe_text"] = gr.Textbox(value="", lines=14, label="Recipe (TOML)", elem_id="rebasin_recipe_text")
    with gr.Row():
        c["recipe_apply"] = gr.Button("Apply text", elem_id="rebasin_recipe_apply")
        c["recipe_clear"] = gr.Button("New recipe", elem_id="rebasin_recipe_clear")
    with gr.Row(elem_classes=["rebasin-model-row"]):
        c["recipe_meta_model"] = gr.Dropdown(choices=list(titles), value=None,
                                             label="Load recipe from a checkpoint's metadata",
                                             elem_id="rebasin_recipe_meta_model")
        c["recipe_meta_load"] = gr.Button("Load recipe", elem_id="rebasin_recipe_meta_load")
    with gr.Row():
        c["recipe_output_name"] = gr.Textbox(label="Output name (in the checkpoint folder)", max_lines=1,
                                             placeholder="empty = the recipe name",
                                             elem_id="rebasin_recipe_output_name")
        c["recipe_overwrite"] = gr.Checkbox(value=False, label="Overwrite if it exists",
                                            elem_id="rebasin_recipe_overwrite")
    with gr.Row(elem_id="rebasin_recipe_run_buttons"):
        c["recipe_run"] = gr.Button("Run recipe", variant="primary", elem_id="rebasin_recipe_run")
        c["recipe_stop"] = gr.Button("Stop", elem_id="rebasin_recipe_stop")


def _recipe_events(c: dict[str, Any], host: Host, service: MergeService, label_to_method: dict[str, str],
                   part_label_to_key: dict[str, str], dropdowns: list[Any], follow_job: Callable[..., Any],
                   lists_after_save: Callable[..., list[Any]]) -> None:
    """Wire the recipe section. Every builder button: (text, settings, step form) -> new canonical text."""
    view_outputs = [c["recipe_text"], c["recipe_overview"], c["recipe_error"], c["recipe_step"], c["recipe_a"],
                    c["recipe_b"], c["recipe_c"], c["recipe_name"], c["recipe_precision"], c["recipe_device"],
                    c["recipe_seed"], c["recipe_step_name"]]
    settings_inputs = [c["recipe_text"], c["recipe_name"], c["recipe_precision"], c["recipe_device"],
                       c["recipe_seed"]]
    form_inputs = [c["recipe_step"], c["recipe_method"], c["recipe_a"], c["recipe_b"], c["recipe_c"],
                   c["recipe_alpha"], c["recipe_iterations"], c["recipe_parts"], c["recipe_step_name"]]

    def entries():
        return service.checkpoints()

    def view(text: str, selected: int | None = None) -> list[Any]:
        labels = rb.step_labels(text)
        sel = labels[selected] if selected is not None and 0 <= selected < len(labels) else None
        choices = rb.ref_choices(text, None, entries())
        st = rb.settings_of(text)
        dev_ok = st["device"] in host.device_choices()
        return [text, rb.recipe_markdown(text), "", update(choices=labels, value=sel),
                *[update(choices=choices) for _ in range(3)], st["name"], st["precision"],
                update(value=st["device"]) if dev_ok else update(), st["seed"], ""]

    def refused(e: Exception) -> list[Any]:
        return [update(), update(), error_html(str(e), "Recipe"), *[update() for _ in range(len(view_outputs) - 3)]]

    def form(method, a, b, cc, alpha, iterations, parts, name) -> rb.StepForm:
        return rb.StepForm(method=label_to_method.get(method, method), a=a, b=b, c=cc, alpha=float(alpha),
                           iterations=int(iterations), parts=tuple(part_label_to_key.get(p, p) for p in parts or []),
                           name=name or "")

    def op(kind: str):
        def handler(text, name, precision, device, seed, step, method, a, b, cc, alpha, iterations, parts,
                    step_name):
            try:
                text = rb.sync_settings(text or "", name, precision, device, seed)
                i = rb.label_index(step)
                f = form(method, a, b, cc, alpha, iterations, parts, step_name)
                if kind == "add":
                    if i is not None and f.name and f.name == rb.step_name(text, i):
                        f.name = ""  # the selected step's name, filled in for "Update": a new step gets its own
                    new = rb.add_step(text, f, entries())
                    return view(new, len(rb.step_labels(new)) - 1)
                if kind == "update":
                    return view(rb.update_step(text, i, f, entries()), i)
                if kind == "remove":
                    new = rb.remove_step(text, i)
                    return view(new, min(i, len(rb.step_labels(new)) - 1) if rb.step_labels(new) else None)
                if kind in ("up", "down"):
                    new = rb.move_step(text, i, -1 if kind == "up" else 1)
                    n = len(rb.step_labels(new))
                    return view(new, max(0, min(n - 1, i + (-1 if kind == "up" else 1))))
                raise AssertionError(kind)
            except (RebasinError, ValueError) as e:
                return refused(e)

        return handler

    for kind in ("add", "update", "remove", "up", "down"):
        c[f"recipe_{kind}"].click(fn=op(kind), inputs=settings_inputs + form_inputs, outputs=view_outputs)

    def apply_text(text):
        try:
            return view(rb.apply_text(text or ""), None)
        except RebasinError as e:
            return refused(e)

    c["recipe_apply"].click(fn=apply_text, inputs=[c["recipe_text"]], outputs=view_outputs)

    def bake_vae(text, choice):
        # Only the user's pick reaches here (the dropdown is never set by other events); the overview says which
        # VAE the recipe text bakes in, whatever the dropdown shows.
        try:
            new = rb.set_bake_vae(text or "", choice, host.list_vaes(), entries())
            return new, rb.recipe_markdown(new), ""
        except RebasinError as e:
            return update(), update(), error_html(str(e), "Recipe")

    c["recipe_bake_vae"].change(fn=bake_vae, inputs=[c["recipe_text"], c["recipe_bake_vae"]],
                                outputs=[c["recipe_text"], c["recipe_overview"], c["recipe_error"]])
    c["recipe_clear"].click(fn=lambda: view(rb.dump(rb.load("")), None), inputs=[], outputs=view_outputs)

    def load_meta(title):
        try:
            entry = service.resolve(title, "Checkpoint")
            return view(rb.from_checkpoint(entry.path), None)
        except RebasinError as e:
            return refused(e)

    c["recipe_meta_load"].click(fn=load_meta, inputs=[c["recipe_meta_model"]], outputs=view_outputs)

    def select_step(text, step):
        i = rb.label_index(step)
        try:
            if i is None:
                raise RebasinError("no step")
            f = rb.step_form(text or "", i, entries())
        except RebasinError:
            return [update() for _ in range(9)]
        methods = {v: k for k, v in label_to_method.items()}
        needs_c = f.c is not None
        return [update(value=methods.get(f.method, f.method)), update(value=f.a), update(value=f.b),
                update(value=f.c, visible=needs_c), f.alpha, f.iterations, [PART_LABELS[p] for p in f.parts],
                f.name, ""]

    c["recipe_step"].change(fn=select_step, inputs=[c["recipe_text"], c["recipe_step"]],
                            outputs=[c["recipe_method"], c["recipe_a"], c["recipe_b"], c["recipe_c"],
                                     c["recipe_alpha"], c["recipe_iterations"], c["recipe_parts"],
                                     c["recipe_step_name"], c["recipe_error"]])

    def on_method(label):
        from ..merge import METHODS

        key = label_to_method.get(label, label)
        return (update(visible=bool(getattr(METHODS.get(key), "needs_c", False))),
                update(visible=key in USES_ITERATIONS))

    c["recipe_method"].change(fn=on_method, inputs=[c["recipe_method"]],
                              outputs=[c["recipe_c"], c["recipe_iterations"]])

    def refresh(text, a, b, cc, meta, vae):
        host.refresh_checkpoints()
        try:
            choices = rb.ref_choices(text or "", None, entries())
        except RebasinError:
            choices = service.titles()
        t = service.titles()
        vaes = [rb.NO_VAE, *service.vae_titles(), *t]
        # A VAE that disappeared keeps its name shown (no change event un-bakes it); the run then says it is gone.
        return [*[update(choices=choices, value=v if v in choices else None) for v in (a, b, cc)],
                update(choices=t, value=same_choice(meta, service)),
                update(choices=vaes if vae in vaes else [*vaes, vae])]

    c["recipe_refresh"].click(fn=refresh, inputs=[c["recipe_text"], c["recipe_a"], c["recipe_b"], c["recipe_c"],
                                                  c["recipe_meta_model"], c["recipe_bake_vae"]],
                              outputs=[c["recipe_a"], c["recipe_b"], c["recipe_c"], c["recipe_meta_model"],
                                       c["recipe_bake_vae"]])

    run_outputs = [c["error"], c["progress"], c["result"], c["result_path"], c["load"], c["recipe_run"],
                   c["recipe_text"], *dropdowns, c["recipe_meta_model"]]

    def run_recipe(task_id, text, name, precision, device, seed, output_name, overwrite, a, b, cc, meta):
        tid = task_id if isinstance(task_id, str) and task_id.startswith("task(") else None
        keep = [update() for _ in range(5)]
        try:
            try:
                text = rb.sync_settings(text or "", name, precision, device, seed)
            except (RebasinError, ValueError):
                if tid:
                    host.discard_job(tid)
                raise
            job = service.submit_recipe(RecipeRequest(text, output_name or "", bool(overwrite)), tid)
        except (RebasinError, ValueError) as e:
            yield (error_html(str(e), "Cannot run the recipe"), "", update(), update(), update(),
                   update(interactive=True), *keep)
            return

        def lists_after():
            t = service.titles()
            return [text, *lists_after_save(a, b, cc), update(choices=t, value=same_choice(meta, service))]

        for frame in follow_job(job, [update(), update(), update(), update()], lambda: lists_after()[1:],
                                eta=not (tid and getattr(host, "shows_eta", False))):
            yield (*frame[:6], text, *frame[6:])

    c["recipe_run_event"] = c["recipe_run"].click(
        fn=run_recipe, inputs=[c["task_id"], c["recipe_text"], c["recipe_name"], c["recipe_precision"],
                               c["recipe_device"], c["recipe_seed"], c["recipe_output_name"],
                               c["recipe_overwrite"], *dropdowns, c["recipe_meta_model"]],
        outputs=run_outputs, show_progress=False, **js_kwargs(JS_START))


def wait_until(pred: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    """Small helper for tests and the API: poll `pred` until it holds or `timeout` passes."""
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        time.sleep(step)
    return pred()


__all__ = ["TabUI", "build_tab", "error_html", "progress_html", "result_markdown", "preset_updates",
           "preset_summary", "js_kwargs", "gradio_major", "format_eta"]
