"""The tab's block-weight (MBW) controls and the curve they draw, in the convention of model A's architecture.

A preset dropdown, the values as editable text and as sliders grouped IN / MID / OUT, and a small SVG plot of the
curve (plain inline SVG in a gr.HTML: the same in gradio 3.41 and 4.x, no plotting library). There is one set of
sliders per convention (26 for SD 1.x, 20 for SDXL); choosing model A shows its architecture's set, and a preset
fills in its values for that architecture (`BlockConvention.preset_values`). The rendering helpers are plain
functions (unit-tested without gradio); gradio is only touched inside `build_*` / `wire_*`.
"""

from __future__ import annotations

import html
import os
from collections.abc import Callable
from typing import Any

from ..errors import RebasinError
from ..io.checkpoint import open_checkpoint
from ..merge.block_presets import PRESETS
from ..merge.block_weights import CONVENTIONS, SD1, BlockConvention, convention_for, format_value, parse_blocks
from ..sdxl.config import is_sdxl

CUSTOM = "custom"
ARCHITECTURES = tuple(CONVENTIONS)            # "SD 1.x", "SDXL": one slider set each, in this order
SLIDERS = {a: len(c.ids) for a, c in CONVENTIONS.items()}
SLIDER_COUNT = sum(SLIDERS.values())


def _rows(c: BlockConvention) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """IN / MID and BASE / OUT rows of at most 6 (SD 1.x) or 9 (SDXL) sliders."""
    half = (len(c.ids) - 2) // 2
    ins, outs = c.ids[1:half + 1], c.ids[half + 2:]
    width = 6 if half > 9 else half
    split = [("IN", ins[i:i + width]) for i in range(0, half, width)]
    return (*split, ("MID / BASE", ("M00", "BASE")), *(("OUT", outs[i:i + width]) for i in range(0, half, width)))


SLIDER_ROWS = {a: _rows(c) for a, c in CONVENTIONS.items()}


def slider_id(architecture: str, block: str) -> str:
    """A slider's elem_id: SD 1.x's keep their long-standing ids, SDXL's carry an `xl_`."""
    return f"rebasin_block_{block}" if architecture == SD1.architecture else f"rebasin_block_xl_{block}"


def slider_key(architecture: str, block: str) -> str:
    """A slider's name among the tab's components (`block_IN00`, `block_xl_IN00`)."""
    return slider_id(architecture, block).removeprefix("rebasin_")


def curve_svg(values: tuple[float, ...] | list[float], title: str = "", width: int = 460, height: int = 150) -> str:
    """The UNet weights (all but BASE) as a polyline over IN00..OUTnn, BASE written beside, y = weight of B."""
    ids = convention_for(tuple(values)).ids
    unet = [float(v) for v in values[1:]]
    last = len(unet) - 1
    lo, hi = min(0.0, *unet), max(1.0, *unet)
    pad_l, pad_r, pad_t, pad_b = 30, 10, 18, 22
    w, h = width - pad_l - pad_r, height - pad_t - pad_b

    def x(i: int) -> float:
        return pad_l + w * i / last

    def y(v: float) -> float:
        return pad_t + h * (hi - v) / (hi - lo)

    mid = last // 2
    points = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(unet))
    dots = "".join(f'<circle cx="{x(i):.1f}" cy="{y(v):.1f}" r="2.2"><title>{ids[i + 1]} = '
                   f'{format_value(v)}</title></circle>' for i, v in enumerate(unet))
    ticks = "".join(f'<text x="{x(i):.1f}" y="{height - 6}" font-size="9" text-anchor="middle">{ids[i + 1]}</text>'
                    for i in (0, mid // 2, mid, mid + (mid + 1) // 2, last))
    grid = "".join(f'<line x1="{pad_l}" x2="{width - pad_r}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="currentColor" '
                   f'stroke-opacity="0.15"/><text x="{pad_l - 4}" y="{y(v) + 3:.1f}" font-size="9" '
                   f'text-anchor="end">{format_value(v)}</text>' for v in (lo, (lo + hi) / 2, hi))
    head = html.escape(f"{title}  (BASE = {format_value(values[0])})" if title else f"BASE = {format_value(values[0])}")
    return (f'<svg class="rebasin-curve" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="block weights" fill="currentColor">'
            f'<text x="{pad_l}" y="12" font-size="11">{head}</text>{grid}'
            f'<line x1="{x(mid):.1f}" x2="{x(mid):.1f}" y1="{pad_t}" y2="{pad_t + h}" stroke="currentColor" '
            f'stroke-opacity="0.25" stroke-dasharray="3,3"/>'
            f'<polyline points="{points}" fill="none" stroke="#ff7c00" stroke-width="2"/>{dots}{ticks}</svg>')


def curve_html(values: tuple[float, ...] | list[float] | None, title: str = "", error: str = "") -> str:
    body = curve_svg(values, title) if values is not None else ""
    note = f'<div class="rebasin-error" role="alert">{html.escape(error)}</div>' if error else ""
    return f'<div class="rebasin-blocks-plot">{note}{body}</div>'


def read_blocks(use: bool, text: str, alpha: float = 0.5) -> str:
    """The `blocks` string a MergeRequest gets from the tab: "" when block weights are off; a preset's name when
    the values are exactly that preset's in their convention (choosing a preset fills in its values), so the merge
    records blocks_preset as the CLI and the API do when given the name; else the text, refused by the service if
    bad."""
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
    """The preset whose values (in these values' convention) these are, else CUSTOM."""
    convention = convention_for(tuple(values))
    return next((name for name in PRESETS if convention.preset_values(name) == tuple(values)), CUSTOM)


def text_label(architecture: str) -> str:
    c = CONVENTIONS[architecture]
    more = " (25 = UNet only, BASE = alpha)" if c is SD1 else ""
    return f"{len(c.ids)} values for {architecture}: {c.listing()}{more}; Enter to apply"


def note_markdown(architecture: str) -> str:
    """Which convention the controls show, and why."""
    c = CONVENTIONS[architecture]
    head = (f"Model A is **{architecture}**: {len(c.ids)} block weights ({c.listing()})." if c is not SD1 else
            f"**{architecture}**: {len(c.ids)} block weights ({c.listing()}); an SDXL model A shows SDXL's 20.")
    return head + " A preset gives each block the value of the SD 1.x block of the same name (SuperMerger's reading)."


def architecture_of_file(path: str | os.PathLike[str]) -> str | None:
    """The block convention a checkpoint file takes, from its safetensors header; None where it cannot be told
    cheaply (a pickle would have to be read whole) or the file is unreadable."""
    if not str(path).lower().endswith(".safetensors"):
        return None
    try:
        with open_checkpoint(path) as ck:
            shapes = ck.shapes()
    except (RebasinError, OSError):
        return None
    return "SDXL" if is_sdxl(shapes) else SD1.architecture


def architecture_of_choice(resolve: Callable[[str, str], Any], title: str | None) -> str | None:
    """The architecture of the checkpoint a dropdown value names (`resolve` as MergeService.resolve), or None."""
    if not title:
        return None
    try:
        entry = resolve(title, "Model A")
    except RebasinError:
        return None
    return architecture_of_file(entry.path)


def _sliders_for(architecture: str, values: tuple[float, ...] | None) -> tuple[Any, ...]:
    """Values for every slider of both sets (ARCHITECTURES order): `values` for `architecture`'s, None (kept) for
    the rest."""
    out: list[Any] = []
    for a in ARCHITECTURES:
        out += list(values) if (a == architecture and values is not None) else [None] * SLIDERS[a]
    return tuple(out)


def on_preset(name: str, text: str, architecture: str = SD1.architecture) -> tuple[Any, ...]:
    """Preset chosen -> text, every slider (SLIDER_COUNT), plot, use-blocks on."""
    if name not in PRESETS:
        return (text, *_sliders_for(architecture, None), None, None)
    values = CONVENTIONS[architecture].preset_values(name)
    return (values_text(values), *_sliders_for(architecture, values), curve_html(values, name), True)


def on_text(text: str, alpha: float, architecture: str = SD1.architecture) -> tuple[Any, ...]:
    """Text applied -> every slider, plot, preset; a bad string, or values of another architecture than model A's,
    leaves the sliders and shows the reason in one line."""
    want = CONVENTIONS[architecture]
    try:
        bw = parse_blocks(text or "", float(alpha))
        if bw.preset is not None:
            bw = type(bw)(want.preset_values(bw.preset), bw.preset)
        elif len(bw.values) != len(want.ids):
            raise RebasinError(f"Model A is {architecture}: its block weights are {len(want.ids)} values "
                               f"({want.listing()}); got {len(bw.values)}.")
    except RebasinError as e:
        return (*_sliders_for(architecture, None), curve_html(None, error=str(e)), None)
    name = bw.preset or matching_preset(bw.values)
    return (*_sliders_for(architecture, bw.values), curve_html(bw.values, "" if name == CUSTOM else name), name)


def on_sliders(*values: float) -> tuple[Any, ...]:
    """A slider moved -> text, plot, preset (the preset's name while the values still equal it)."""
    vals = tuple(float(v) for v in values)
    name = matching_preset(vals)
    return values_text(vals), curve_html(vals, "" if name == CUSTOM else name), name


def on_architecture(architecture: str | None, shown: str, preset: str, alpha: float) -> tuple[Any, ...] | None:
    """Model A's architecture known -> (shown architecture, note, text label, text, each set's visibility, every
    slider, plot, preset), or None where nothing changes. A preset is filled in for the new architecture; custom
    values, which have no meaning in the other convention, start again from alpha."""
    if architecture is None or architecture == shown or architecture not in CONVENTIONS:
        return None
    c = CONVENTIONS[architecture]
    name = preset if preset in PRESETS else CUSTOM
    values = c.preset_values(name) if name != CUSTOM else (float(alpha),) * len(c.ids)
    return (architecture, note_markdown(architecture), text_label(architecture), values_text(values),
            *(a == architecture for a in ARCHITECTURES), *_sliders_for(architecture, values),
            curve_html(values, "" if name == CUSTOM else name), name)


def build_block_controls(gr: Any, c: dict[str, Any], d_alpha: float) -> None:
    """Components, inside the caller's current gradio context; SD 1.x's set shown until model A says otherwise."""
    first = SD1.architecture
    with gr.Accordion("Block weights (MBW): a weight of B per UNet block", open=False, elem_id="rebasin_blocks"):
        with gr.Row():
            c["blocks_on"] = gr.Checkbox(value=False, label="Use block weights (they replace alpha)",
                                         elem_id="rebasin_blocks_on")
            c["blocks_preset"] = gr.Dropdown(choices=[CUSTOM, *PRESETS], value=CUSTOM, label="Preset",
                                             elem_id="rebasin_blocks_preset")
        c["blocks_note"] = gr.Markdown(note_markdown(first), elem_id="rebasin_blocks_note")
        # the convention the sliders show (model A's architecture), read by the block events
        c["blocks_arch"] = gr.Textbox(value=first, visible=False, elem_id="rebasin_blocks_arch")
        start = (float(d_alpha),) * len(SD1.ids)
        c["blocks_text"] = gr.Textbox(value=values_text(start), max_lines=1, label=text_label(first),
                                      elem_id="rebasin_blocks_text")
        c["blocks_plot"] = gr.HTML(curve_html(start), elem_id="rebasin_blocks_plot")
        columns = []
        for arch in ARCHITECTURES:
            key = "sd1" if arch == first else "xl"
            with gr.Column(visible=arch == first, elem_id=f"rebasin_blocks_{key}") as column:
                for group, ids in SLIDER_ROWS[arch]:
                    with gr.Row(elem_classes=["rebasin-block-row"]):
                        for block in ids:
                            what = "text encoders, VAE" if block == "BASE" else "middle"
                            c[slider_key(arch, block)] = gr.Slider(
                                minimum=0.0, maximum=1.0, step=0.01, value=float(d_alpha),
                                label=block if group != "MID / BASE" else f"{block} ({what})",
                                elem_id=slider_id(arch, block))
            columns.append(column)
        c["block_columns"] = columns  # a list, as the slider sets: not a form value (TabUI.values)
        # each set in its convention's block order, whatever order the rows are laid out in
        c["block_sliders"] = [c[slider_key(first, b)] for b in SD1.ids]
        c["block_sliders_xl"] = [c[slider_key("SDXL", b)] for b in CONVENTIONS["SDXL"].ids]


def wire_block_events(c: dict[str, Any], update: Callable[..., Any]) -> None:
    sets = {SD1.architecture: c["block_sliders"], "SDXL": c["block_sliders_xl"]}
    sliders = [s for a in ARCHITECTURES for s in sets[a]]

    def keep_or(value: Any) -> Any:
        return update() if value is None else update(value=value)

    def preset_changed(name: str, text: str, arch: str):
        out = on_preset(name, text, arch)
        return [keep_or(v) for v in out]

    c["blocks_preset"].change(fn=preset_changed, inputs=[c["blocks_preset"], c["blocks_text"], c["blocks_arch"]],
                              outputs=[c["blocks_text"], *sliders, c["blocks_plot"], c["blocks_on"]])

    def text_applied(text: str, alpha: float, arch: str):
        out = on_text(text, alpha, arch)
        return [*(keep_or(v) for v in out[:SLIDER_COUNT]), out[SLIDER_COUNT], keep_or(out[SLIDER_COUNT + 1])]

    for event in ("submit", "blur"):
        getattr(c["blocks_text"], event)(fn=text_applied, inputs=[c["blocks_text"], c["alpha"], c["blocks_arch"]],
                                         outputs=[*sliders, c["blocks_plot"], c["blocks_preset"]])

    def slider_moved(*values: float):
        text, plot, name = on_sliders(*values)
        return update(value=text), plot, update(value=name)

    for group in sets.values():
        for s in group:
            # `release` fires only for the user's own drag, not when a preset sets the sliders (no event storm)
            event = getattr(s, "release", None) or s.change
            event(fn=slider_moved, inputs=group, outputs=[c["blocks_text"], c["blocks_plot"], c["blocks_preset"]])



def wire_block_architecture(c: dict[str, Any], update: Callable[..., Any],
                            architecture_of: Callable[[str | None], str | None]) -> None:
    """Model A chosen -> the block controls of its architecture. `architecture_of(model A's dropdown value)`: its
    architecture, or None when unknown (the shown set stays)."""
    sliders = [*c["block_sliders"], *c["block_sliders_xl"]]

    def keep_or(value: Any) -> Any:
        return update() if value is None else update(value=value)

    columns = c["block_columns"]

    def model_a_changed(title: str | None, shown: str, preset: str, alpha: float):
        out = on_architecture(architecture_of(title), shown, preset, alpha)
        if out is None:
            return [update() for _ in range(5 + len(columns) + SLIDER_COUNT)]
        arch, note, label, text, *rest = out
        shown_sets, values, (plot, name) = rest[:len(columns)], rest[len(columns):-2], rest[-2:]
        return [update(value=arch), update(value=note), update(value=text, label=label),
                *(update(visible=v) for v in shown_sets), *(keep_or(v) for v in values), plot, update(value=name)]

    c["model_a"].change(fn=model_a_changed, inputs=[c["model_a"], c["blocks_arch"], c["blocks_preset"], c["alpha"]],
                        outputs=[c["blocks_arch"], c["blocks_note"], c["blocks_text"], *columns, *sliders,
                                 c["blocks_plot"], c["blocks_preset"]])
