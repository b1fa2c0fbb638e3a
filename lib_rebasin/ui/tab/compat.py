"""The gradio subset the tab uses, the same on 3.41 (A1111, reForge, SD.Next) and 4.x (Forge).

`gr.update`, the client-side hook passed as `_js=` on 3.x and `js=` on 4.x, no `.style()`, no `gr.Box`, no layout
`scale`. gradio is imported inside functions only, so the tab's modules load where it is not installed.
"""

from __future__ import annotations

from typing import Any


def gradio_major() -> int:
    import gradio as gr

    return int(str(gr.__version__).split(".")[0])


def js_kwargs(js: str) -> dict[str, str]:
    """The client-side hook keyword for this gradio: `_js` on 3.x, `js` on 4.x."""
    return {"js": js} if gradio_major() >= 4 else {"_js": js}


def update(**kw: Any) -> Any:
    import gradio as gr

    return gr.update(**kw)


def keep() -> Any:
    """An output left as it is."""
    return update()


# Components whose first value comes from Settings -> Re-Basin. The WebUI's ui-config.json would pin the value they
# had on the first start (modules/ui_loadsave.py) and override Settings forever after; the host skips components
# that carry this attribute.
NOT_IN_UI_CONFIG = "do_not_save_to_config"

# JS hooks. Each is inline and guarded, so the tab works where javascript/rebasin.js is not loaded (standalone).


def js_start(task_position: int, anchor: str = "rebasin_progress_anchor") -> str:
    """The Merge / Run recipe / Compare hook: javascript/rebasin.js gives the job a WebUI task id (at
    `task_position` of the event's inputs) and attaches the host's progress bar to it, in the element `anchor`."""
    return (f"(...args) => {{ if (typeof rebasin_start_merge === 'function') {{ "
            f"return rebasin_start_merge({int(task_position)}, args, '{anchor}'); }} return args; }}")


JS_SELECT_CHECKPOINT = ("(title) => { if (title && typeof selectCheckpoint === 'function') { selectCheckpoint(title); }"
                        " return []; }")
JS_SWITCH_TXT2IMG = ("() => { if (typeof rebasin_switch_to_txt2img === 'function') { rebasin_switch_to_txt2img(); }"
                     " return []; }")


def js_apply_hires(denoise: float, scale: float, steps: int) -> str:
    """A hires preset set in the page's DOM, where the adapter could not capture txt2img's components."""
    return (f"() => {{ if (typeof rebasin_apply_hires === 'function') {{ rebasin_apply_hires({denoise}, "
            f"{scale}, {steps}); }} return []; }}")
