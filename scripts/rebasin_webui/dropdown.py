"""The host's checkpoint dropdowns: the entry they list for a checkpoint, the choice saved as the dropdown saves
it, and the top-left dropdown (captured by on_after_component) kept up to date by the tab's save and load."""

import gradio as gr
from modules import sd_models, shared

from rebasin_webui.host_facts import is_forge, opt


def dropdown_value(info):
    """The entry the host's checkpoint dropdowns list for `info` (sd_models.checkpoint_tiles, in the order of
    checkpoints_list): "name [hash]" titles in A1111, bare names in Forge, short titles with the host's
    sd_checkpoint_dropdown_use_short. Every one of them is among the file's checkpoint_aliases."""
    infos = list(sd_models.checkpoints_list.values())
    tiles = checkpoint_choices()
    for i, candidate in enumerate(infos):
        if candidate is info and len(tiles) == len(infos):
            return tiles[i]
    return info.title


def persist_checkpoint(title):
    """What the host's checkpoint dropdown does on change (ui_settings.run_settings_single): set the option, then
    save config.json, so a restart keeps the model. The option's onchange reload finds it loaded already."""
    shared.opts.set("sd_model_checkpoint", title)
    shared.opts.save(shared.config_filename)


def checkpoint_choices():
    use_short = bool(opt("sd_checkpoint_dropdown_use_short", False))
    try:
        return sd_models.checkpoint_tiles(use_short)
    except TypeError:
        return sd_models.checkpoint_tiles()


def refresh_checkpoint_dropdown(_path=None):
    """The top-left dropdown after a save: fresh choices, value kept."""
    return gr.update(choices=checkpoint_choices())


def select_in_checkpoint_dropdown(title):
    """The top-left dropdown after "Load merged model": fresh choices, showing the loaded model."""
    if not title:
        return gr.update()
    return gr.update(choices=checkpoint_choices(), value=title)



def wire_checkpoint_dropdown(tab, dropdown):
    """The tab's saved path refreshes the dropdown's choices; its loaded title selects the model in it. Once."""
    if tab is None or getattr(dropdown, "_rebasin_wired", False):
        return
    tab["result_path"].change(fn=refresh_checkpoint_dropdown, inputs=[tab["result_path"]], outputs=[dropdown])
    tab["loaded_title"].change(fn=select_in_checkpoint_dropdown, inputs=[tab["loaded_title"]], outputs=[dropdown])
    dropdown._rebasin_wired = True


def is_checkpoint_dropdown(component, kwargs):
    elem_id = kwargs.get("elem_id") or getattr(component, "elem_id", None)
    if elem_id == "setting_sd_model_checkpoint":
        return True
    classes = kwargs.get("elem_classes") or []
    classes = [classes] if isinstance(classes, str) else list(classes)
    label = str(kwargs.get("label") or "")
    return is_forge() and "model_selection" in classes and "checkpoint" in label.lower()


def in_layout(kwargs):
    """Whether a component is being built into the page. gradio 4 also constructs a component, with render=False
    and outside any Blocks, for every property update it sends (Forge's checkpoint dropdown gets one on each page
    load and checkpoint switch), and the host's after_component hook fires for those copies too."""
    if kwargs.get("render") is False:
        return False
    try:
        from gradio.context import Context
    except ImportError:  # pragma: no cover - every supported gradio has it
        return True
    return Context.root_block is not None
