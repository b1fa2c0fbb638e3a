"""The tab's block-weight (MBW) controls and the curve they draw.

A preset dropdown, the 26 values as editable text and as sliders grouped IN / MID / OUT, and a small SVG plot of
the curve (plain inline SVG in a gr.HTML: the same in gradio 3.41 and 4.x, no plotting library). The rendering
helpers are plain functions (unit-tested without gradio); gradio is only touched inside `build_*` / `wire_*`.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from typing import Any

from ..errors import RebasinError
from ..merge.block_presets import PRESETS
from ..merge.block_weights import BLOCK_IDS, format_value, parse_blocks

CUSTOM = "custom"
SLIDER_ROWS = (("IN", BLOCK_IDS[1:7]), ("IN", BLOCK_IDS[7:13]), ("MID / BASE", ("M00", "BASE")),
               ("OUT", BLOCK_IDS[14:20]), ("OUT", BLOCK_IDS[20:26]))


def curve_svg(values: tuple[float, ...] | list[float], title: str = "", width: int = 460, height: int = 150) -> str:
    """The 25 UNet weights as a polyline over IN00..OUT11 (BASE written beside), y = weight of B in [0, 1]."""
    unet = [float(v) for v in values[1:]]
    lo, hi = min(0.0, *unet), max(1.0, *unet)
    pad_l, pad_r, pad_t, pad_b = 30, 10, 18, 22
    w, h = width - pad_l - pad_r, height - pad_t - pad_b

    def x(i: int) -> float:
        return pad_l + w * i / 24

    def y(v: float) -> float:
        return pad_t + h * (hi - v) / (hi - lo)

    points = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(unet))
    dots = "".join(f'<circle cx="{x(i):.1f}" cy="{y(v):.1f}" r="2.2"><title>{BLOCK_IDS[i + 1]} = '
                   f'{format_value(v)}</title></circle>' for i, v in enumerate(unet))
    ticks = "".join(f'<text x="{x(i):.1f}" y="{height - 6}" font-size="9" text-anchor="middle">{label}</text>'
                    for i, label in ((0, "IN00"), (6, "IN06"), (12, "M00"), (18, "OUT06"), (24, "OUT11")))
    grid = "".join(f'<line x1="{pad_l}" x2="{width - pad_r}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="currentColor" '
                   f'stroke-opacity="0.15"/><text x="{pad_l - 4}" y="{y(v) + 3:.1f}" font-size="9" '
                   f'text-anchor="end">{format_value(v)}</text>' for v in (lo, (lo + hi) / 2, hi))
    head = html.escape(f"{title}  (BASE = {format_value(values[0])})" if title else f"BASE = {format_value(values[0])}")
    return (f'<svg class="rebasin-curve" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="block weights" fill="currentColor">'
            f'<text x="{pad_l}" y="12" font-size="11">{head}</text>{grid}'
            f'<line x1="{x(12):.1f}" x2="{x(12):.1f}" y1="{pad_t}" y2="{pad_t + h}" stroke="currentColor" '
            f'stroke-opacity="0.25" stroke-dasharray="3,3"/>'
            f'<polyline points="{points}" fill="none" stroke="#ff7c00" stroke-width="2"/>{dots}{ticks}</svg>')


def curve_html(values: tuple[float, ...] | list[float] | None, title: str = "", error: str = "") -> str:
    body = curve_svg(values, title) if values is not None else ""
    note = f'<div class="rebasin-error" role="alert">{html.escape(error)}</div>' if error else ""
    return f'<div class="rebasin-blocks-plot">{note}{body}</div>'


def read_blocks(use: bool, text: str, alpha: float = 0.5) -> str:
    """The `blocks` string a MergeRequest gets from the tab: "" when block weights are off; a preset's name when
    the values are exactly that preset's (choosing a preset fills in its values), so the merge records
    blocks_preset as the CLI and the API do when given the name; else the text, refused by the service if bad."""
    raw = (text or "").strip()
    if not use:
        return ""
    try:
        bw = parse_blocks(raw, float(alpha))
    except (RebasinError, ValueError, TypeError):
        return raw
    name = bw.preset or matching_preset(bw.values)
    return raw if name == CUSTOM else name


def values_text(values: tuple[float, ...] | list[float]) -> str:
    return ",".join(format_value(float(v)) for v in values)


def matching_preset(values: tuple[float, ...]) -> str:
    return next((name for name, v in PRESETS.items() if tuple(v) == tuple(values)), CUSTOM)


def build_block_controls(gr: Any, c: dict[str, Any], d_alpha: float) -> None:
    """Components, inside the caller's current gradio context."""
    with gr.Accordion("Block weights (MBW): a weight of B per UNet block", open=False, elem_id="rebasin_blocks"):
        with gr.Row():
            c["blocks_on"] = gr.Checkbox(value=False, label="Use block weights (they replace alpha)",
                                         elem_id="rebasin_blocks_on")
            c["blocks_preset"] = gr.Dropdown(choices=[CUSTOM, *PRESETS], value=CUSTOM, label="Preset",
                                             elem_id="rebasin_blocks_preset")
        start = (float(d_alpha),) * 26
        c["blocks_text"] = gr.Textbox(value=values_text(start), max_lines=1,
                                      label="26 values: BASE, IN00..IN11, M00, OUT00..OUT11 (25 = UNet only, BASE = "
                                            "alpha); Enter to apply", elem_id="rebasin_blocks_text")
        c["blocks_plot"] = gr.HTML(curve_html(start), elem_id="rebasin_blocks_plot")
        c["block_sliders"] = []
        for group, ids in SLIDER_ROWS:
            with gr.Row(elem_classes=["rebasin-block-row"]):
                for block in ids:
                    what = "text encoder, VAE" if block == "BASE" else "middle"
                    s = gr.Slider(minimum=0.0, maximum=1.0, step=0.01, value=float(d_alpha),
                                  label=f"{block}" if group != "MID / BASE" else f"{block} ({what})",
                                  elem_id=f"rebasin_block_{block}")
                    c[f"block_{block}"] = s
        # sliders in BLOCK_IDS order, whatever order the rows are laid out in
        c["block_sliders"] = [c[f"block_{b}"] for b in BLOCK_IDS]


def on_preset(name: str, text: str) -> tuple[Any, ...]:
    """Preset chosen -> text, 26 sliders, plot, use-blocks on."""
    if name not in PRESETS:
        return (text, *([None] * 26), None, None)
    values = PRESETS[name]
    return (values_text(values), *values, curve_html(values, name), True)


def on_text(text: str, alpha: float) -> tuple[Any, ...]:
    """Text applied -> 26 sliders, plot, preset; a bad string leaves the sliders and shows the reason."""
    try:
        bw = parse_blocks(text or "", float(alpha))
    except RebasinError as e:
        return (*([None] * 26), curve_html(None, error=str(e)), None)
    if len(bw.values) != len(BLOCK_IDS):  # SDXL's 20 values: the sliders and the plot are SD 1.x's 26 blocks
        return (*([None] * 26), curve_html(None), None)
    name = bw.preset or matching_preset(bw.values)
    return (*bw.values, curve_html(bw.values, "" if name == CUSTOM else name), name)


def on_sliders(*values: float) -> tuple[Any, ...]:
    """A slider moved -> text, plot, preset (the preset's name while the values still equal it)."""
    vals = tuple(float(v) for v in values)
    name = matching_preset(vals)
    return values_text(vals), curve_html(vals, "" if name == CUSTOM else name), name


def wire_block_events(c: dict[str, Any], update: Callable[..., Any]) -> None:
    sliders = c["block_sliders"]

    def keep_or(value: Any) -> Any:
        return update() if value is None else update(value=value)

    def preset_changed(name: str, text: str):
        out = on_preset(name, text)
        return [keep_or(out[0]), *(keep_or(v) for v in out[1:27]), keep_or(out[27]), keep_or(out[28])]

    c["blocks_preset"].change(fn=preset_changed, inputs=[c["blocks_preset"], c["blocks_text"]],
                              outputs=[c["blocks_text"], *sliders, c["blocks_plot"], c["blocks_on"]])

    def text_applied(text: str, alpha: float):
        out = on_text(text, alpha)
        return [*(keep_or(v) for v in out[:26]), out[26], keep_or(out[27])]

    for event in ("submit", "blur"):
        getattr(c["blocks_text"], event)(fn=text_applied, inputs=[c["blocks_text"], c["alpha"]],
                                         outputs=[*sliders, c["blocks_plot"], c["blocks_preset"]])

    def slider_moved(*values: float):
        text, plot, name = on_sliders(*values)
        return update(value=text), plot, update(value=name)

    for s in sliders:
        # `release` fires only for the user's own drag, not when a preset sets the sliders (no event storm)
        event = getattr(s, "release", None) or s.change
        event(fn=slider_moved, inputs=sliders, outputs=[c["blocks_text"], c["blocks_plot"], c["blocks_preset"]])
