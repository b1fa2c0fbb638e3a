"""AUTOMATIC1111 / Forge / reForge (and, best effort, SD.Next) entry point of the Re-Basin extension.

The only file the WebUI loads as a script; with scripts/rebasin_webui/ (imported from here, see its __init__) the
only code that imports the WebUI's `modules`. It adapts the host to `lib_rebasin.ui.host.Host` and registers:
  - the "Re-Basin" tab (elem_id `rebasin`) via on_ui_tabs,
  - default settings via on_ui_settings (read back with opts.data.get, so --nowebui still works),
  - the txt2img hires-fix components and the top-left checkpoint dropdown via on_after_component,
  - the HTTP API via on_app_started, only when the host serves its own API (--api or --nowebui), behind the
    host's --api-auth and CORS origins.
Callbacks are registered without `name=` because SD.Next's on_* functions do not accept it.
"""

import os
import sys
import traceback

_SCRIPTS_DIR = os.path.dirname(os.path.realpath(__file__))
_EXT_ROOT = os.path.dirname(_SCRIPTS_DIR)
for _path in (_SCRIPTS_DIR, _EXT_ROOT):  # the WebUI prefixes the root only while importing this file
    if _path not in sys.path:
        sys.path.insert(0, _path)

import gradio as gr  # noqa: E402
from modules import script_callbacks, shared  # noqa: E402

from lib_rebasin.methods import METHODS  # noqa: E402
from lib_rebasin.options import OPTIONS  # noqa: E402
from lib_rebasin.ui.api import register_api  # noqa: E402
from lib_rebasin.ui.api_policy import ALLOWED_HOSTS_ENV, ApiPolicy, listen_address  # noqa: E402
from lib_rebasin.ui.generation import GENERATION_FIELDS  # noqa: E402
from lib_rebasin.ui.host import HIRES_ELEM_IDS  # noqa: E402
from lib_rebasin.ui.service import MergeService  # noqa: E402
from lib_rebasin.ui.tab import build_tab  # noqa: E402
from rebasin_webui.dropdown import (  # noqa: E402
    in_layout,
    is_checkpoint_dropdown,
    wire_checkpoint_dropdown,
)
from rebasin_webui.host import WebUIHost  # noqa: E402
from rebasin_webui.host_facts import opt  # noqa: E402

TAB_TITLE = "Re-Basin"
TAB_ID = "rebasin"
SECTION = ("rebasin", "Re-Basin")
_ID_TO_KEY = {v: k for k, v in HIRES_ELEM_IDS.items()}
_GEN_ID_TO_KEY = {f.elem_id: f.name for f in GENERATION_FIELDS}

HOST = WebUIHost()
SERVICE = MergeService(HOST)
TAB = None


def _method_choices():
    """(label, key) pairs: the Settings page shows "Re-basin (weight matching)", the option stores "rebasin"."""
    return [(m.label, key) for key, m in METHODS.items()]


# The Settings page groups sections by category (modules/options.py: a section without one is "Uncategorized");
# merging checkpoints sits with the host's own Stable Diffusion settings.
CATEGORY = "sd"


def on_ui_settings():
    section = SECTION
    add = shared.opts.add_option
    options = {
        "rebasin_default_method": shared.OptionInfo(
            OPTIONS["method"].default, "Default merge method", gr.Radio, {"choices": _method_choices()},
            section=section),
        "rebasin_default_iterations": shared.OptionInfo(
            1, "Default iterations (re-basin and legacy)", gr.Slider,
            {"minimum": OPTIONS["iterations"].low, "maximum": OPTIONS["iterations"].high, "step": 1},
            section=section),
        "rebasin_default_device": shared.OptionInfo(
            "auto", "Default device (auto = GPU when it has enough VRAM and no --lowvram/--medvram, else CPU)",
            gr.Radio, {"choices": [("Auto", "auto"), ("CPU", "cpu"), ("GPU", "gpu")]}, section=section),
        "rebasin_default_precision": shared.OptionInfo(
            OPTIONS["precision"].default, "Default save precision", gr.Radio,
            {"choices": list(OPTIONS["precision"].choices)}, section=section),
        "rebasin_output_dir": shared.OptionInfo(
            "", "Output folder for merges (empty = the WebUI checkpoint folder)", gr.Textbox, section=section),
        ALLOWED_HOSTS_OPTION: shared.OptionInfo(
            "", "HTTP API: extra host names it answers to, comma-separated (a tunnel's or cloud proxy's name; "
                "*.proxy.example for all its names)", gr.Textbox, section=section),
    }
    for key, info in options.items():
        info.category_id = CATEGORY  # set, not passed: OptionInfo takes no category_id on older hosts and SD.Next
        add(key, info)


def on_ui_tabs():
    global TAB
    TAB = build_tab(HOST, SERVICE, title=TAB_TITLE)
    if HOST.checkpoint_dropdown is not None:  # captured earlier (not so in A1111 1.10 or Forge, kept for others)
        with TAB.blocks:
            wire_checkpoint_dropdown(TAB, HOST.checkpoint_dropdown)
    return [(TAB.blocks, TAB_TITLE, TAB_ID)]


def on_after_component(component, **kwargs):
    if not in_layout(kwargs):
        return
    elem_id = kwargs.get("elem_id") or getattr(component, "elem_id", None)
    gen = _GEN_ID_TO_KEY.get(elem_id)
    if gen is not None:
        HOST.generation_targets[gen] = component
    key = _ID_TO_KEY.get(elem_id)
    if key is not None:
        HOST.targets[key] = component
    elif HOST.checkpoint_dropdown is None and is_checkpoint_dropdown(component, kwargs):
        HOST.checkpoint_dropdown = component
        try:
            wire_checkpoint_dropdown(TAB, component)
        except Exception:
            traceback.print_exc()


def api_enabled():
    """The host serves its API (modules/api) only with --api, or --nowebui (API only): so do we."""
    opts = shared.cmd_opts
    return bool(getattr(opts, "api", False) or getattr(opts, "nowebui", False))


# The one setting that lets the API answer to another host name (a tunnel, a cloud proxy), three ways: this option
# (read on each request), --rebasin-allowed-hosts (preload.py), and the environment variable.
ALLOWED_HOSTS_OPTION = "rebasin_allowed_hosts"
ALLOW_HINT = (f"Settings > Re-Basin > 'HTTP API: extra host names', --rebasin-allowed-hosts, or {ALLOWED_HOSTS_ENV} "
              "(comma-separated; *.domain for a proxy)")


def api_policy():
    opts = shared.cmd_opts
    return ApiPolicy.from_flags(
        getattr(opts, "api_auth", None), getattr(opts, "cors_allow_origins", None),
        getattr(opts, "cors_allow_origins_regex", None),
        listen=listen_address(getattr(opts, "server_name", None), bool(getattr(opts, "listen", False))),
        allowed_hosts=getattr(opts, "rebasin_allowed_hosts", None), share=bool(getattr(opts, "share", False)),
        ngrok=bool(getattr(opts, "ngrok", None)), live_hosts=lambda: str(opt(ALLOWED_HOSTS_OPTION, "") or ""),
        allow_hint=ALLOW_HINT)


def on_model_loaded(sd_model):
    HOST.model_loaded(sd_model)


def on_app_started(demo, app):
    if api_enabled():
        register_api(app, SERVICE, api_policy())


script_callbacks.on_ui_settings(on_ui_settings)
script_callbacks.on_after_component(on_after_component)
script_callbacks.on_ui_tabs(on_ui_tabs)
script_callbacks.on_app_started(on_app_started)
script_callbacks.on_model_loaded(on_model_loaded)
