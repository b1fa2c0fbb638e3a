"""The Re-Basin tab as a gradio Blocks, built against a `Host`.

Only the gradio subset that runs on both 3.41 (A1111, reForge, SD.Next) and 4.x (Forge): `gr.update`, the JS
hook passed as `_js=` on 3.x and `js=` on 4.x, no `.style()`, no `gr.Box`, no layout `scale`. gradio is
imported inside `build_tab` only.
"""

from __future__ import annotations

import html
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import RebasinError
from .host import HIRES_ADVICE, HIRES_ELEM_IDS, HIRES_PRESETS, Host, HiresPreset, hires_values
from .service import PART_LABELS, PARTS, PRECISION_CHOICES, MergeRequest, MergeService, format_eta, method_table

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
"""

# JS hooks. Each is inline and guarded, so the tab works where javascript/rebasin.js is not loaded (standalone).
JS_START = ("(...args) => { if (typeof rebasin_start_merge === 'function') { return rebasin_start_merge(...args); }"
            " return args; }")
JS_SELECT_CHECKPOINT = ("(title) => { if (title && typeof selectCheckpoint === 'function') { selectCheckpoint(title); }"
                        " return []; }")
JS_SWITCH_TXT2IMG = ("() => { if (typeof rebasin_switch_to_txt2img === 'function') { rebasin_switch_to_txt2img(); }"
                     " return []; }")


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

def error_html(message: str | None) -> str:
    if not message:
        return ""
    return f'<div class="rebasin-error" role="alert"><b>Cannot merge:</b> {html.escape(message)}</div>'


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
    return "\n".join(lines)


def preset_updates(preset: HiresPreset, targets: dict[str, Any], current_upscaler: str | None) -> list[Any]:
    """gr.update values for the captured txt2img components, in HIRES_ELEM_IDS order (present ones only)."""
    up = targets.get("upscaler")
    values = hires_values(preset, getattr(up, "choices", None), current_upscaler)
    out = []
    for key in HIRES_ELEM_IDS:
        if key in targets:
            v = values[key]
            out.append(update() if v is None else update(value=v))
    return out


def preset_summary(preset: HiresPreset, targets: dict[str, Any], current_upscaler: str | None,
                   where: str) -> str:
    up = targets.get("upscaler")
    values = hires_values(preset, getattr(up, "choices", None), current_upscaler)
    upscaler = values["upscaler"] or "the current upscaler"
    return (f"**{preset.label}** {where}: hires fix on, denoising strength {preset.denoise:.2f}, upscale "
            f"x{preset.scale:g}, upscaler {upscaler}, hires steps {preset.steps or 'same as first pass'} "
            f"({preset.note}). Your prompt is unchanged.")


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
                for key, label in (("a", "Model A"), ("b", "Model B"), ("c", "Model C (add difference: A + alpha·(B − C))")):
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
                with gr.Row():
                    c["iterations"] = gr.Slider(minimum=1, maximum=500, step=1, value=d_iterations,
                                                label="Iterations", elem_id="rebasin_iterations")
                    c["parts"] = gr.CheckboxGroup(choices=[PART_LABELS[p] for p in PARTS],
                                                  value=[PART_LABELS[p] for p in PARTS], label="Parts to merge",
                                                  elem_id="rebasin_parts")
                with gr.Row():
                    c["device"] = gr.Dropdown(choices=devices, value=d_device, label="Device",
                                              elem_id="rebasin_device")
                    c["precision"] = gr.Radio(choices=list(PRECISION_CHOICES), value=d_precision,
                                              label="Save precision", elem_id="rebasin_precision")
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
            return [update(choices=t, value=v if v in t else None) for v in (a, b, cc)]

        for key in "abc":
            c[f"refresh_{key}"].click(fn=refresh_lists, inputs=dropdowns, outputs=dropdowns)

        def on_method(label: str):
            key = label_to_method.get(label, label)
            needs_c = bool(getattr(methods.get(key), "needs_c", False))
            return update(visible=needs_c), update(visible=needs_c), method_help(key)

        c["method"].change(fn=on_method, inputs=[c["method"]], outputs=[c["model_c"], c["refresh_c"], c["method_help"]])

        merge_inputs = [c["task_id"], c["model_a"], c["model_b"], c["model_c"], c["method"], c["alpha"],
                        c["iterations"], c["parts"], c["device"], c["precision"], c["output_name"], c["overwrite"]]
        merge_outputs = [c["error"], c["progress"], c["result"], c["result_path"], c["load"], c["merge"], *dropdowns]

        def lists_after_save(a, b, cc):
            t = service.titles()  # the host rescanned its folders after the save
            return [update(choices=t, value=v if v in t else None) for v in (a, b, cc)]

        def run_merge(task_id, a, b, cc, method, alpha, iterations, parts, device, precision, name, overwrite):
            key = label_to_method.get(method, method)
            req = MergeRequest(model_a=a or "", model_b=b or "", model_c=cc, method=key, alpha=float(alpha),
                               iterations=int(iterations), parts=tuple(part_label_to_key.get(p, p) for p in parts or []),
                               device=device or "", precision=precision or "", output_name=name or "",
                               overwrite=bool(overwrite))
            tid = task_id if isinstance(task_id, str) and task_id.startswith("task(") else None
            keep = [update(), update(), update()]
            try:
                job = service.submit(req, tid)
            except RebasinError as e:
                yield (error_html(str(e)), "", update(), update(), update(), update(interactive=True), *keep)
                return
            last = None
            while True:
                done = job.wait(POLL_S)
                d = job.to_dict()
                state = d["status"] if done else "running"
                frame = (progress_html(d["fraction"], d["status_line"], state), state)
                if frame != last:
                    last = frame
                    if not done:
                        yield ("", frame[0], "", update(), update(interactive=False), update(interactive=False),
                               *keep)
                if done:
                    break
            d = job.to_dict()
            if d["status"] == "done":
                yield ("", last[0], result_markdown(d), d["output"], update(interactive=True),
                       update(interactive=True), *lists_after_save(a, b, cc))
            elif d["status"] == "failed":
                yield (error_html(d["error"]), last[0], "", "", update(interactive=False), update(interactive=True),
                       *keep)
            else:
                yield "", last[0], "", "", update(interactive=False), update(interactive=True), *keep

        c["merge_event"] = c["merge"].click(fn=run_merge, inputs=merge_inputs, outputs=merge_outputs,
                                            show_progress=False, **js_kwargs(JS_START))

        def stop():
            job = service.cancel()
            return "Stopping: the merge ends at the next checkpoint and writes no file." if job else "Nothing is running."

        c["stop"].click(fn=stop, inputs=[], outputs=[c["load_status"]], queue=False)

        def do_load(path: str):
            if not path:
                return "Merge a model first.", ""
            try:
                from pathlib import Path

                title = host.load_checkpoint(Path(path))
            except RebasinError as e:
                return f"Could not load: {e}", ""
            except Exception as e:  # the host's loader failed: say so in one line
                return f"Could not load the merged model ({type(e).__name__}: {e}).", ""
            return f"Loaded **{title}** for txt2img and img2img.", title

        c["load_event"] = c["load"].click(fn=do_load, inputs=[c["result_path"]],
                                          outputs=[c["load_status"], c["loaded_title"]])
        c["load_event"].then(fn=None, inputs=[c["loaded_title"]], outputs=[], **js_kwargs(JS_SELECT_CHECKPOINT))

        target_keys = [k for k in HIRES_ELEM_IDS if k in targets]
        where = "set in txt2img" if target_keys else "(no txt2img here; these are the values to use)"
        for p in HIRES_PRESETS:
            btn = c[f"preset_{p.key}"]
            if target_keys:
                def apply(current=None, _p=p):
                    return [*preset_updates(_p, targets, current), preset_summary(_p, targets, current, where)]

                up = [targets["upscaler"]] if "upscaler" in targets else []
                ev = btn.click(fn=apply, inputs=up, outputs=[targets[k] for k in target_keys] + [c["preset_note"]])
                ev.then(fn=None, inputs=[], outputs=[], **js_kwargs(JS_SWITCH_TXT2IMG))
            else:
                js = (f"() => {{ if (typeof rebasin_apply_hires === 'function') {{ rebasin_apply_hires({p.denoise}, "
                      f"{p.scale}, {p.steps}); }} return []; }}")
                btn.click(fn=lambda _p=p: preset_summary(_p, targets, None, where), inputs=[],
                          outputs=[c["preset_note"]], **js_kwargs(js))

    return TabUI(blocks, c)


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
