"""The "Generate with hires fix" presets: set txt2img's hires-fix fields from Python where the host adapter
captured them, else from the page's JavaScript."""

from __future__ import annotations

from typing import Any

from ..host import (
    HIRES_ELEM_IDS,
    HIRES_PRESETS,
    HiresPreset,
    Host,
    hires_values,
    known_downloads,
)
from .compat import JS_SWITCH_TXT2IMG, js_apply_hires, js_kwargs, keep, update
from .rendering import md_escape


def preset_updates(preset: HiresPreset, targets: dict[str, Any], current_upscaler: str | None,
                   ready: set[str] | None = None, architecture: str | None = None) -> list[Any]:
    """gr.update values for the captured txt2img components, in HIRES_ELEM_IDS order (present ones only)."""
    up = targets.get("upscaler")
    values = hires_values(preset, getattr(up, "choices", None), current_upscaler, ready, architecture)
    out = []
    for key in HIRES_ELEM_IDS:
        if key in targets:
            v = values[key]
            out.append(keep() if v is None else update(value=v))
    return out


def preset_summary(preset: HiresPreset, targets: dict[str, Any], current_upscaler: str | None,
                   where: str, ready: set[str] | None = None, architecture: str | None = None) -> str:
    up = targets.get("upscaler")
    values = hires_values(preset, getattr(up, "choices", None), current_upscaler, ready, architecture)
    upscaler = values["upscaler"] or "the current upscaler"
    why = ""
    if values["upscaler"] and ready is not None:
        skipped = known_downloads(getattr(up, "choices", None), ready, values["upscaler"])
        why = " (installed, nothing to download" + (f"; {' and '.join(skipped)} would need a download first"
                                                    if skipped else "") + ")"
    return (f"**{preset.label}** {where}: hires fix on, denoising strength {preset.denoise:.2f}, upscale "
            f"x{values['scale']:g}{' (model A is SDXL)' if architecture == 'SDXL' else ''}, upscaler "
            f"**{md_escape(upscaler)}**{md_escape(why)}, hires steps "
            f"{preset.steps or 'same as first pass'} ({preset.note}). Your prompt is unchanged.")


def wire_hires_presets(c: dict[str, Any], host: Host) -> None:
    """One button per preset: the captured txt2img components and the note, then a switch to txt2img."""
    targets = dict(host.hires_targets() or {})
    target_keys = [k for k in HIRES_ELEM_IDS if k in targets]
    where = "set in txt2img" if target_keys else "(no txt2img here; these are the values to use)"
    for p in HIRES_PRESETS:
        button = c[f"preset_{p.key}"]
        if target_keys:
            upscaler = [targets["upscaler"]] if "upscaler" in targets else []

            def apply(*given: str | None, _p: HiresPreset = p, _n: int = len(upscaler)) -> list[Any]:
                """`given`: the upscaler where captured, then model A's architecture (the block controls')."""
                current = given[0] if _n and given else None
                architecture = given[_n] if len(given) > _n else None
                ready = host.ready_upscalers()  # asked per click: the user may have installed one since
                return [*preset_updates(_p, targets, current, ready, architecture),
                        preset_summary(_p, targets, current, where, ready, architecture)]

            event = button.click(fn=apply, inputs=[*upscaler, c["blocks_arch"]],
                                 outputs=[targets[k] for k in target_keys] + [c["preset_note"]])
            event.then(fn=None, inputs=[], outputs=[], **js_kwargs(JS_SWITCH_TXT2IMG))
        else:
            button.click(fn=lambda _p=p: preset_summary(_p, targets, None, where), inputs=[],
                         outputs=[c["preset_note"]], **js_kwargs(js_apply_hires(p.denoise, p.scale, p.steps)))
