"""The tab's components, built inside the caller's gradio Blocks: the merge form, the recipe section, the output
column with the hires-fix presets. Nothing here wires an event."""

from __future__ import annotations

import html
from typing import Any

from ...methods import METHODS
from ...options import OPTIONS
from .. import blocks_ui, recipe_builder
from ..host import HIRES_ADVICE, HIRES_PRESETS
from . import controls
from .context import Defaults, method_label, part_labels
from .rendering import md_escape

MODEL_LABELS = {"a": "Model A", "b": "Model B",
                "c": "Model C (the base B was tuned from; "
                     + ", ".join(m.label for m in METHODS.values() if m.needs_c) + ")"}
ITERATIONS = OPTIONS["iterations"]  # one limit in every interface: the table's
REFRESH = "\u21bb"
TOOL = ["tool", "rebasin-tool"]
RECIPE_HELP = ("Build a chain of merges (like DunkMash: several re-basin merges, then an add difference) and run it "
               "in one go; only the last step is saved, with the full recipe in its metadata. A step's A/B/C are "
               "installed checkpoints or **earlier steps** (`[step] name`). The text box is the recipe itself: "
               "edit it and press **Apply text**, or use the buttons.")

UNSAVED_HELP = ("**Merge & load (no file)** merges in memory and loads the result for txt2img / img2img at once; "
                "nothing is written until you press **Save this merge** (the same file Merge would have written). "
                "Picking another checkpoint discards it.")
NO_GENERATOR_HELP = ("*Merge & load (no file) needs the WebUI's image generator; this program has none: use "
                     "Merge to save the merge as a file.*")

COMPARE_HELP = ("Pick A and B (C where the method needs it) and the method above, then the values of **one** axis. "
                "Each candidate is merged in memory (re-basin matches the pair **once** for every alpha), loaded, "
                "and drawn with txt2img's prompt, negative prompt, seed, size, steps, sampler and hires fix as they "
                "are; the grid is saved where txt2img saves grids. Stop gives back the model loaded before. Then "
                "**Load** or **Save** the candidate you like (the same file Merge writes).")
NO_GENERATOR_COMPARE_HELP = ("*A compare grid needs the WebUI's image generator; this program has none. The sweep "
                             "below saves one file per alpha value instead (B matched onto A once); load them in "
                             "your generator to compare.*")
AXIS_LABELS = {"alpha": "Alpha values", "method": "Methods", "blocks": "Block-weight presets"}


def method_help(key: str) -> str:
    return md_escape(METHODS[key].help) if key in METHODS else ""


def build_layout(gr: Any, d: Defaults, title: str, titles: list[str], vae_choices: list[str],
                 in_memory: bool = True) -> dict[str, Any]:
    """Every component of the tab by name; `in_memory`: the host can load a merge without saving it."""
    c: dict[str, Any] = {}
    with gr.Row(elem_id="rebasin_main_row"):
        with gr.Column(elem_id="rebasin_inputs"):
            gr.HTML(f"<h2 class='rebasin-title'>{html.escape(title)} merge</h2>"
                    "<p class='rebasin-lead'>Align model B's neurons to model A (weight matching), then "
                    "interpolate. The result is saved as a new checkpoint.</p>")
            _merge_form(gr, c, d, titles, vae_choices, in_memory)
            with gr.Accordion("Compare: a grid over one axis (same prompt and seed)", open=False,
                              elem_id="rebasin_compare"):
                _compare_form(gr, c, in_memory)
            with gr.Accordion("Recipe: a chain of merges in one run", open=False, elem_id="rebasin_recipe"):
                _recipe_form(gr, c, d, titles, vae_choices)
        with gr.Column(elem_id="rebasin_outputs"):
            _outputs(gr, c)
    return c


def _merge_form(gr: Any, c: dict[str, Any], d: Defaults, titles: list[str], vae_choices: list[str],
                in_memory: bool = True) -> None:
    for key, label in MODEL_LABELS.items():
        with gr.Row(elem_id=f"rebasin_model_{key}_row", elem_classes=["rebasin-model-row"]):
            shown = key != "c" or METHODS[d.method].needs_c
            c[f"model_{key}"] = gr.Dropdown(choices=titles, value=None, label=label, elem_id=f"rebasin_model_{key}",
                                            visible=shown)
            c[f"refresh_{key}"] = gr.Button(REFRESH, elem_id=f"rebasin_refresh_{key}", elem_classes=TOOL,
                                            visible=shown)
    c["method"] = gr.Radio(choices=[m.label for m in METHODS.values()], value=method_label(d.method), label="Method",
                           elem_id="rebasin_method")
    c["method_help"] = gr.Markdown(method_help(d.method), elem_id="rebasin_method_help")
    c["alpha"] = gr.Slider(minimum=0.0, maximum=1.0, step=0.01, value=d.alpha,
                           label="Alpha (0 = model A, 1 = model B)", elem_id="rebasin_alpha")
    controls.build_param_controls(gr, c, d.method)
    blocks_ui.build_block_controls(gr, c, d.alpha)
    with gr.Row():
        c["iterations"] = gr.Slider(minimum=ITERATIONS.low, maximum=ITERATIONS.high, step=1, value=d.iterations,
                                    label="Iterations",
                                    elem_id="rebasin_iterations", visible=METHODS[d.method].iterates)
        c["parts"] = gr.CheckboxGroup(choices=part_labels(), value=part_labels(), label="Parts to merge",
                                      elem_id="rebasin_parts")
    c["tolerance"] = gr.Slider(
        minimum=0.0, maximum=10.0, step=0.1, value=d.tolerance_percent,
        label="Re-basin: stop matching when a sweep adds less than this % of the first sweep's gain "
              "(0 = until nothing improves; much slower on unrelated models)",
        elem_id="rebasin_tolerance", visible=METHODS[d.method].aligns)
    analysis = [shown["visible"] for shown in controls.analysis_visibility(d.method, False, d.matching, False)]
    with gr.Row(elem_id="rebasin_matching_row"):
        c["matching"] = controls.option_control(
            gr, OPTIONS["matching"], "rebasin_matching", visible=analysis[0],
            label="Re-basin matching (re-basin, or another method with 'align'): by weights, or by activations on "
                  "seeded prompts (slower)")
        c["activation_samples"] = controls.option_control(gr, OPTIONS["activation_samples"],
                                                          "rebasin_activation_samples", visible=analysis[1],
                                                          label="Activation matching / REPAIR: prompts")
        c["repair"] = controls.option_control(gr, OPTIONS["repair"], "rebasin_repair", visible=analysis[2],
                                              label="REPAIR: restore the parents' activation statistics after "
                                                    "blending")
    controls.build_advanced_controls(gr, c, d.method)
    with gr.Row():
        c["device"] = gr.Dropdown(choices=d.devices, value=d.device, label="Device", elem_id="rebasin_device")
        c["precision"] = gr.Radio(choices=list(OPTIONS["precision"].choices), value=d.precision, label="Save precision",
                                  elem_id="rebasin_precision")
    with gr.Row(elem_classes=["rebasin-model-row"]):
        c["bake_vae"] = gr.Dropdown(choices=vae_choices, value=recipe_builder.NO_VAE,
                                    label="Bake in VAE (a file from the VAE folder, or a checkpoint's "
                                          "VAE; replaces the merged VAE)", elem_id="rebasin_bake_vae")
        c["refresh_vae"] = gr.Button(REFRESH, elem_id="rebasin_refresh_vae", elem_classes=TOOL)
    with gr.Row():
        c["output_name"] = gr.Textbox(label="Output name (saved as .safetensors in the checkpoint folder)",
                                      placeholder="empty = <A>_<B>_<method>_<alpha>", elem_id="rebasin_output_name",
                                      max_lines=1)
        c["overwrite"] = gr.Checkbox(value=False, label="Overwrite if it exists", elem_id="rebasin_overwrite")
    with gr.Row(elem_id="rebasin_buttons"):
        c["merge"] = gr.Button("Merge", variant="primary", elem_id="rebasin_merge")
        c["merge_load"] = gr.Button("Merge & load (no file)", elem_id="rebasin_merge_load", interactive=in_memory)
        c["stop"] = gr.Button("Stop", elem_id="rebasin_stop")
    c["merge_load_help"] = gr.Markdown(UNSAVED_HELP if in_memory else NO_GENERATOR_HELP,
                                       elem_id="rebasin_merge_load_help")
    c["task_id"] = gr.Textbox(value="", visible=False, elem_id="rebasin_task_id")


def _compare_form(gr: Any, c: dict[str, Any], in_memory: bool) -> None:
    """The compare grid (WebUI) or, without a generator, the sweep (one file per alpha) in its place."""
    c["compare_help"] = gr.Markdown(COMPARE_HELP if in_memory else NO_GENERATOR_COMPARE_HELP,
                                    elem_id="rebasin_compare_help")
    with gr.Row():
        c["compare_axis"] = gr.Radio(choices=list(AXIS_LABELS.values()), value=AXIS_LABELS["alpha"],
                                     label="Vary", elem_id="rebasin_compare_axis", visible=in_memory)
        c["compare_values"] = gr.Textbox(value="0.2, 0.35, 0.5, 0.65, 0.8", max_lines=1,
                                         label="Values (comma-separated: alphas, method names, or block presets)",
                                         elem_id="rebasin_compare_values")
    with gr.Row(elem_id="rebasin_compare_buttons"):
        c["compare_run"] = gr.Button("Compare", variant="primary", elem_id="rebasin_compare_run", visible=in_memory)
        c["compare_sweep"] = gr.Button("Sweep: save one file per alpha", elem_id="rebasin_compare_sweep",
                                       visible=not in_memory)
        c["compare_stop"] = gr.Button("Stop", elem_id="rebasin_compare_stop")
    c["compare_error"] = gr.HTML("", elem_id="rebasin_compare_error")
    c["compare_progress_anchor"] = gr.HTML("", elem_id="rebasin_compare_progress_anchor")
    c["compare_status"] = gr.HTML("", elem_id="rebasin_compare_status")
    # no label badge: gradio draws it over the picture's top-left corner, where the first cell's label is
    c["compare_grid"] = gr.Image(value=None, label="Grid", show_label=False, type="pil", interactive=False,
                                 elem_id="rebasin_compare_grid", visible=in_memory)
    c["compare_info"] = gr.Markdown("", elem_id="rebasin_compare_info")
    with gr.Row(elem_id="rebasin_compare_pick_row", visible=in_memory):
        c["compare_pick"] = gr.Dropdown(choices=[], value=None, label="Candidate", elem_id="rebasin_compare_pick")
        c["compare_save_name"] = gr.Textbox(value="", max_lines=1, label="Save as (empty = the usual name)",
                                            elem_id="rebasin_compare_save_name")
    with gr.Row(elem_id="rebasin_compare_pick_buttons", visible=in_memory):
        c["compare_load"] = gr.Button("Load this candidate", elem_id="rebasin_compare_load", interactive=False)
        c["compare_save"] = gr.Button("Save this candidate", elem_id="rebasin_compare_save", interactive=False)


def _recipe_form(gr: Any, c: dict[str, Any], d: Defaults, titles: list[str], vae_choices: list[str]) -> None:
    c["recipe_help"] = gr.Markdown(RECIPE_HELP, elem_id="rebasin_recipe_help")
    c["recipe_error"] = gr.HTML("", elem_id="rebasin_recipe_error")
    c["recipe_overview"] = gr.Markdown(recipe_builder.recipe_markdown(""), elem_id="rebasin_recipe_overview")
    with gr.Row():
        c["recipe_name"] = gr.Textbox(value="my_recipe", label="Recipe name", max_lines=1,
                                      elem_id="rebasin_recipe_name")
        c["recipe_seed"] = gr.Number(value=0, precision=0, label="Seed", elem_id="rebasin_recipe_seed")
    with gr.Row():
        c["recipe_device"] = gr.Dropdown(choices=d.devices, value=d.device, label="Device (all steps)",
                                         elem_id="rebasin_recipe_device")
        c["recipe_precision"] = gr.Radio(choices=list(OPTIONS["precision"].choices), value=d.precision,
                                         label="Precision (all steps)", elem_id="rebasin_recipe_precision")
    with gr.Row(elem_classes=["rebasin-model-row"]):
        c["recipe_bake_vae"] = gr.Dropdown(choices=vae_choices, value=recipe_builder.NO_VAE,
                                           label="Bake in VAE (the output's VAE: a VAE file, or a checkpoint's)",
                                           elem_id="rebasin_recipe_bake_vae")
    gr.HTML("<h4 class='rebasin-subtitle'>Step</h4>")
    with gr.Row():
        c["recipe_step"] = gr.Dropdown(choices=[], value=None, label="Step to edit, move or remove",
                                       elem_id="rebasin_recipe_step")
        c["recipe_step_name"] = gr.Textbox(value="", label="Step name (empty = automatic)", max_lines=1,
                                           elem_id="rebasin_recipe_step_name")
    c["recipe_method"] = gr.Radio(choices=[m.label for m in METHODS.values()], value=method_label(d.method),
                                  label="Method", elem_id="rebasin_recipe_method")
    for key in "abc":
        with gr.Row(elem_classes=["rebasin-model-row"]):
            c[f"recipe_{key}"] = gr.Dropdown(choices=list(titles), value=None, label=f"Model {key.upper()}",
                                             elem_id=f"rebasin_recipe_{key}",
                                             visible=(key != "c" or METHODS[d.method].needs_c))
    with gr.Row():
        c["recipe_alpha"] = gr.Slider(minimum=0.0, maximum=1.0, step=0.01, value=d.alpha, label="Alpha",
                                      elem_id="rebasin_recipe_alpha")
        c["recipe_iterations"] = gr.Slider(minimum=ITERATIONS.low, maximum=ITERATIONS.high, step=1,
                                           value=d.iterations, label="Iterations",
                                           elem_id="rebasin_recipe_iterations",
                                           visible=METHODS[d.method].iterates)
    c["recipe_parts"] = gr.CheckboxGroup(choices=part_labels(), value=part_labels(), label="Parts",
                                         elem_id="rebasin_recipe_parts")
    with gr.Row(elem_id="rebasin_recipe_step_buttons"):
        c["recipe_add"] = gr.Button("Add step", variant="primary", elem_id="rebasin_recipe_add")
        c["recipe_update"] = gr.Button("Update step", elem_id="rebasin_recipe_update")
        c["recipe_remove"] = gr.Button("Remove step", elem_id="rebasin_recipe_remove")
        c["recipe_up"] = gr.Button("\u2191 Up", elem_id="rebasin_recipe_up")
        c["recipe_down"] = gr.Button("\u2193 Down", elem_id="rebasin_recipe_down")
        c["recipe_refresh"] = gr.Button(REFRESH, elem_id="rebasin_recipe_refresh", elem_classes=TOOL)
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


def _outputs(gr: Any, c: dict[str, Any]) -> None:
    c["error"] = gr.HTML("", elem_id="rebasin_error")
    c["progress_anchor"] = gr.HTML("", elem_id="rebasin_progress_anchor")
    c["progress"] = gr.HTML("", elem_id="rebasin_progress")
    c["result"] = gr.Markdown("", elem_id="rebasin_result")
    c["result_path"] = gr.Textbox(value="", visible=False, elem_id="rebasin_result_path")
    with gr.Row():
        c["load"] = gr.Button("Load merged model", elem_id="rebasin_load", interactive=False)
    c["load_status"] = gr.Markdown("", elem_id="rebasin_load_status")
    c["unsaved_status"] = gr.Markdown("", elem_id="rebasin_unsaved_status")
    with gr.Row():
        c["save_unsaved"] = gr.Button("Save this merge", elem_id="rebasin_save_unsaved", interactive=False)
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
