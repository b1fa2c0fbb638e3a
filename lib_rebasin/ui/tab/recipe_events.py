"""The recipe section's events. Every builder button turns (text, settings, step form) into new canonical text
through ui/recipe_builder.py; a refusal leaves the text as it was and says why."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ...errors import RebasinError
from .. import recipe_builder as builder
from ..request import RecipeRequest
from .compat import js_kwargs, js_start, keep, update
from .context import (
    TabContext,
    method_key,
    method_label,
    method_of,
    part_keys,
    part_labels,
)
from .fields import Fields
from .merge_events import (
    MODEL_DROPDOWNS,
    Frame,
    follow_job,
    lists_after_save,
    same_choice,
    shows_eta,
    task_id_of,
)
from .rendering import error_html

SETTINGS_FIELDS = ("recipe_text", "recipe_name", "recipe_precision", "recipe_device", "recipe_seed")
STEP_FIELDS = ("recipe_step", "recipe_method", "recipe_a", "recipe_b", "recipe_c", "recipe_alpha",
               "recipe_iterations", "recipe_parts", "recipe_step_name")
# What a builder button shows: the text and its overview, the error box, the step selector, A/B/C, the settings.
VIEW_OUTPUTS = ("recipe_text", "recipe_overview", "recipe_error", "recipe_step", "recipe_a", "recipe_b", "recipe_c",
                "recipe_name", "recipe_precision", "recipe_device", "recipe_seed", "recipe_step_name")
# What choosing a step fills in: the step form without the selector, then the error box.
SELECT_OUTPUTS = (*STEP_FIELDS[1:], "recipe_error")
RUN_FIELDS = ("task_id", "recipe_text", "recipe_name", "recipe_precision", "recipe_device", "recipe_seed",
              "recipe_output_name", "recipe_overwrite", *MODEL_DROPDOWNS, "recipe_meta_model")
RUN_OUTPUTS = ("error", "progress", "result", "result_path", "load", "recipe_run", "recipe_text", *MODEL_DROPDOWNS,
               "recipe_meta_model")
REFRESH_FIELDS = ("recipe_text", "recipe_a", "recipe_b", "recipe_c", "recipe_meta_model", "recipe_bake_vae")
BUILDER_OPS = ("add", "update", "remove", "up", "down")


def step_form(v: dict[str, Any]) -> builder.StepForm:
    return builder.StepForm(method=method_key(v["recipe_method"]), a=v["recipe_a"], b=v["recipe_b"],
                            c=v["recipe_c"], alpha=float(v["recipe_alpha"]), iterations=int(v["recipe_iterations"]),
                            parts=part_keys(v["recipe_parts"]), name=v["recipe_step_name"] or "")


def apply_op(kind: str, v: dict[str, Any], entries: list[Any]) -> tuple[str, int | None]:
    """The builder button `kind` on the form's values: (new text, the step to select)."""
    text = builder.sync_settings(v["recipe_text"] or "", v["recipe_name"], v["recipe_precision"],
                                 v["recipe_device"], v["recipe_seed"])
    i = builder.label_index(v["recipe_step"])
    form = step_form(v)
    if kind == "add":
        if i is not None and form.name and form.name == builder.step_name(text, i):
            form.name = ""  # the selected step's name, filled in for "Update": a new step gets its own
        new = builder.add_step(text, form, entries)
        return new, len(builder.step_labels(new)) - 1
    if i is None:
        raise RebasinError("Pick a step first.")
    if kind == "update":
        return builder.update_step(text, i, form, entries), i
    if kind == "remove":
        new = builder.remove_step(text, i)
        return new, (min(i, len(builder.step_labels(new)) - 1) if builder.step_labels(new) else None)
    delta = -1 if kind == "up" else 1
    new = builder.move_step(text, i, delta)
    return new, max(0, min(len(builder.step_labels(new)) - 1, i + delta))


def wire_recipe_events(ctx: TabContext) -> None:
    c, host, service = ctx.c, ctx.host, ctx.service
    view_outputs = [c[k] for k in VIEW_OUTPUTS]

    def view(text: str, selected: int | None = None) -> list[Any]:
        labels = builder.step_labels(text)
        sel = labels[selected] if selected is not None and 0 <= selected < len(labels) else None
        choices = builder.ref_choices(text, None, service.checkpoints())
        st = builder.settings_of(text)
        device = update(value=st["device"]) if st["device"] in host.device_choices() else keep()
        return [text, builder.recipe_markdown(text), "", update(choices=labels, value=sel),
                *[update(choices=choices) for _ in range(3)], st["name"], st["precision"], device, st["seed"], ""]

    def refused(e: Exception) -> list[Any]:
        return [keep(), keep(), error_html(str(e), "Recipe"), *[keep() for _ in range(len(view_outputs) - 3)]]

    form = Fields(c, SETTINGS_FIELDS + STEP_FIELDS)

    def op(kind: str) -> Any:
        def handler(values: dict[Any, Any]) -> list[Any]:
            try:
                return view(*apply_op(kind, form.read(values), service.checkpoints()))
            except (RebasinError, ValueError) as e:
                return refused(e)

        return handler

    for kind in BUILDER_OPS:
        c[f"recipe_{kind}"].click(fn=op(kind), inputs=form.inputs, outputs=view_outputs)

    def apply_text(text: str | None) -> list[Any]:
        try:
            return view(builder.apply_text(text or ""), None)
        except RebasinError as e:
            return refused(e)

    c["recipe_apply"].click(fn=apply_text, inputs=[c["recipe_text"]], outputs=view_outputs)

    def bake_vae(text: str | None, choice: str | None) -> tuple[Any, Any, str]:
        # Only the user's pick reaches here (the dropdown is never set by other events); the overview says which
        # VAE the recipe text bakes in, whatever the dropdown shows.
        try:
            new = builder.set_bake_vae(text or "", choice, host.list_vaes(), service.checkpoints())
            return new, builder.recipe_markdown(new), ""
        except RebasinError as e:
            return keep(), keep(), error_html(str(e), "Recipe")

    c["recipe_bake_vae"].change(fn=bake_vae, inputs=[c["recipe_text"], c["recipe_bake_vae"]],
                                outputs=[c["recipe_text"], c["recipe_overview"], c["recipe_error"]])
    c["recipe_clear"].click(fn=lambda: view(builder.dump(builder.load("")), None), inputs=[], outputs=view_outputs)

    def load_meta(title: str | None) -> list[Any]:
        try:
            entry = service.resolve(title, "Checkpoint")
            return view(builder.from_checkpoint(entry.path), None)
        except RebasinError as e:
            return refused(e)

    c["recipe_meta_load"].click(fn=load_meta, inputs=[c["recipe_meta_model"]], outputs=view_outputs)

    def select_step(text: str | None, step: str | None) -> list[Any]:
        i = builder.label_index(step)
        try:
            if i is None:
                raise RebasinError("no step")
            f = builder.step_form(text or "", i, service.checkpoints())
        except RebasinError:
            return [keep() for _ in SELECT_OUTPUTS]
        return [update(value=method_label(f.method)), update(value=f.a), update(value=f.b),
                update(value=f.c, visible=f.c is not None), f.alpha, f.iterations, part_labels(f.parts), f.name, ""]

    c["recipe_step"].change(fn=select_step, inputs=[c["recipe_text"], c["recipe_step"]],
                            outputs=[c[k] for k in SELECT_OUTPUTS])

    def on_method(label: str) -> tuple[Any, Any]:
        info = method_of(label)
        return update(visible=info.needs_c), update(visible=info.iterates)

    c["recipe_method"].change(fn=on_method, inputs=[c["recipe_method"]],
                              outputs=[c["recipe_c"], c["recipe_iterations"]])

    lists = Fields(c, REFRESH_FIELDS)

    def refresh(values: dict[Any, Any]) -> list[Any]:
        v = lists.read(values)
        host.refresh_checkpoints()
        try:
            choices = builder.ref_choices(v["recipe_text"] or "", None, service.checkpoints())
        except RebasinError:
            choices = service.titles()
        vaes, vae = ctx.vae_choices(), v["recipe_bake_vae"]
        # A VAE that disappeared keeps its name shown (no change event un-bakes it); the run then says it is gone.
        return [*[update(choices=choices, value=x if x in choices else None)
                  for x in (v["recipe_a"], v["recipe_b"], v["recipe_c"])],
                update(choices=service.titles(), value=same_choice(v["recipe_meta_model"], service)),
                update(choices=vaes if vae in vaes else [*vaes, vae])]

    c["recipe_refresh"].click(fn=refresh, inputs=lists.inputs,
                              outputs=[c[k] for k in ("recipe_a", "recipe_b", "recipe_c", "recipe_meta_model",
                                                      "recipe_bake_vae")])

    run = Fields(c, RUN_FIELDS)

    def run_recipe(values: dict[Any, Any]) -> Iterator[Frame]:
        v = run.read(values)
        tid = task_id_of(v["task_id"])
        kept = [keep() for _ in range(5)]
        try:
            try:
                text = builder.sync_settings(v["recipe_text"] or "", v["recipe_name"], v["recipe_precision"],
                                             v["recipe_device"], v["recipe_seed"])
            except (RebasinError, ValueError):
                if tid:
                    host.discard_job(tid)
                raise
            job = service.submit_recipe(RecipeRequest(text, v["recipe_output_name"] or "",
                                                      bool(v["recipe_overwrite"])), tid)
        except (RebasinError, ValueError) as e:
            yield (error_html(str(e), "Cannot run the recipe"), "", keep(), keep(), keep(),
                   update(interactive=True), *kept)
            return

        def lists_after() -> list[Any]:
            return [*lists_after_save(ctx, *(v[k] for k in MODEL_DROPDOWNS)),
                    update(choices=service.titles(), value=same_choice(v["recipe_meta_model"], service))]

        for frame in follow_job(job, [keep(), keep(), keep(), keep()], lists_after, eta=shows_eta(ctx, tid)):
            yield (*frame[:6], text, *frame[6:])

    c["recipe_run_event"] = c["recipe_run"].click(
        fn=run_recipe, inputs=run.inputs, outputs=[c[k] for k in RUN_OUTPUTS], show_progress=False,
        **js_kwargs(js_start(run.position("task_id"))))
