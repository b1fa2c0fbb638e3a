"""The merge form's option controls, made from the option table (options.OPTIONS): one control per option, in the
widget its declaration names, with its bounds and default, shown for the methods it applies to (MethodInfo's
flags). The tab's own wording of a few labels is given where the control is placed."""

from __future__ import annotations

from typing import Any

from ...methods import ALL_PARAMS, METHODS, MethodInfo
from ...option import Option
from ...options import OPTIONS, users_of

# Options the form places itself (their own rows and wording); every other option of the "advanced" group gets a
# generated control in the "Advanced options" accordion.
PLACED = ("method", "alpha", "iterations", "parts", "device", "precision", "seed", "tolerance", "align", "matching",
          "activation_samples", "repair", "blocks", "blocks_preset")
# The seed shows for the random methods only (MethodInfo.random), so its label names what it seeds there.
SEED_LABEL = "Seed (drop masks of " + ", ".join(m.label for m in METHODS.values() if m.random) + ")"
ADVANCED = tuple(o.name for o in OPTIONS.values() if o.group == "advanced" and o.user_input and o.name not in PLACED
                 and not o.method_param)


def option_control(gr: Any, option: Option, elem_id: str, visible: bool = True, label: str | None = None,
                   info: str | None = None) -> Any:
    """The control `option.widget` names, starting at the option's default."""
    kw: dict[str, Any] = {"value": option.default, "label": label or option.label, "elem_id": elem_id,
                          "visible": visible}
    if info:
        kw["info"] = info
    if option.widget == "slider":
        step = option.step or (1 if option.kind is int else 0.01)
        low = option.low if option.low is not None else 0
        low = low + step if option.low_open else low
        return gr.Slider(minimum=low, maximum=option.high, step=step, **kw)
    if option.widget == "checkbox":
        return gr.Checkbox(**kw)
    if option.widget == "radio":
        return gr.Radio(choices=list(option.choices), **kw)
    if option.widget == "dropdown":
        return gr.Dropdown(choices=list(option.choices), **kw)
    if option.widget == "checkboxes":
        return gr.CheckboxGroup(choices=list(option.choices), **kw)
    if option.widget == "text":
        return gr.Textbox(max_lines=1, **kw)
    return gr.Number(precision=0 if option.kind is int else None, **kw)


def can_align(info: MethodInfo) -> bool:
    """Whether the align checkbox means anything: the method accepts it and does not align by itself."""
    return info.alignable and not info.aligns


def build_param_controls(gr: Any, c: dict[str, Any], method: str) -> None:
    """One control per method parameter, shown only for the methods that use it; the seed; alignment."""
    info = METHODS[method]
    with gr.Row(elem_id="rebasin_method_params"):
        for name, p in ALL_PARAMS.items():
            users = ", ".join(METHODS[m].label for m in users_of(p))
            c[f"param_{name}"] = option_control(gr, p, f"rebasin_param_{name}", visible=p.applies_to(info),
                                                label=f"{p.label} ({users})")
        c["param_seed"] = option_control(gr, OPTIONS["seed"], "rebasin_param_seed", visible=info.random,
                                         label=SEED_LABEL)
        c["align"] = option_control(gr, OPTIONS["align"], "rebasin_align", visible=can_align(info))


def build_advanced_controls(gr: Any, c: dict[str, Any], method: str) -> None:
    """The table's advanced options the form does not place itself (max_sweeps, allow_nonfinite, ...)."""
    info = METHODS[method]
    with gr.Accordion("Advanced options", open=False, elem_id="rebasin_advanced"):
        for name in ADVANCED:
            option = OPTIONS[name]
            c[name] = option_control(gr, option, f"rebasin_{name}", visible=option.applies_to(info),
                                     info=option.help)


def param_visibility(method: str) -> list[dict[str, Any]]:
    """Visibility of each parameter control (ALL_PARAMS order), then the seed, then the align checkbox."""
    info = METHODS[method]
    return ([{"visible": p.applies_to(info)} for p in ALL_PARAMS.values()]
            + [{"visible": info.random}, {"visible": can_align(info)}])


def advanced_visibility(method: str) -> list[dict[str, Any]]:
    """Visibility of each generated advanced control (ADVANCED order)."""
    info = METHODS[method]
    return [{"visible": OPTIONS[name].applies_to(info)} for name in ADVANCED]


def analysis_visibility(method: str, align: Any, matching: Any, repair: Any) -> list[dict[str, Any]]:
    """Visibility of the matching radio, the activation prompts slider and the REPAIR checkbox: matching chooses
    how re-basin aligns, so it shows where the merge aligns (the method does, or align is on); REPAIR for the
    methods it restores (MethodInfo.repairable); the prompts wherever activation matching or REPAIR uses them."""
    info = METHODS[method]
    aligned = info.aligns or (bool(align) and can_align(info))
    prompts = (aligned and matching == "activations") or (info.repairable and bool(repair))
    return [{"visible": aligned}, {"visible": prompts}, {"visible": info.repairable}]
