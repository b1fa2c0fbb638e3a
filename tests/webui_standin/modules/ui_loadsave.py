"""Stand-in for modules.ui_loadsave: ui-config.json, which pins every tracked component's first value.

Shaped like A1111 1.10 / Forge `UiLoadsave.add_component` / `add_block`: a component's value is saved under
"<tab>/<label>/value" the first time the UI is built and forced back onto it on every later start, unless the
component carries `do_not_save_to_config`. Only the value field of the component types the tab uses is modeled.
"""

import json
import os

import gradio as gr


class UiLoadsave:
    def __init__(self, filename):
        self.filename = filename
        self.ui_settings = {}
        if os.path.isfile(filename):
            with open(filename, encoding="utf8") as f:
                self.ui_settings = json.load(f)

    def add_component(self, path, x):
        def apply_field(obj, field):
            key = f"{path}/{field}"
            if getattr(obj, "do_not_save_to_config", False):
                return
            saved_value = self.ui_settings.get(key, None)
            if saved_value is None:
                self.ui_settings[key] = getattr(obj, field)
            else:
                setattr(obj, field, saved_value)

        if type(x) in (gr.Slider, gr.Radio, gr.Checkbox, gr.Textbox, gr.Number, gr.Dropdown) and x.visible:
            apply_field(x, "visible")
        if type(x) in (gr.Slider, gr.Radio, gr.Checkbox, gr.Textbox, gr.Number, gr.Dropdown):
            apply_field(x, "value")

    def add_block(self, x, path=""):
        if hasattr(x, "children"):
            for c in x.children:
                self.add_block(c, path)
        elif getattr(x, "label", None) is not None:
            self.add_component(f"{path}/{x.label}", x)

    def dump(self):
        with open(self.filename, "w", encoding="utf8") as f:
            json.dump(self.ui_settings, f, indent=4)
