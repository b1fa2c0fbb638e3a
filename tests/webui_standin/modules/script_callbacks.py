"""Stand-in: records registrations like modules/script_callbacks.py (callbacks take no `name=` here, as on SD.Next)."""

from . import record

callbacks: dict[str, list] = {"ui_tabs": [], "ui_settings": [], "after_component": [], "app_started": [],
                              "script_unloaded": [], "model_loaded": []}


def _add(kind, fn):
    record("script_callbacks.on_" + kind, getattr(fn, "__name__", repr(fn)))
    callbacks[kind].append(fn)


def on_ui_tabs(fn):
    _add("ui_tabs", fn)


def on_ui_settings(fn):
    _add("ui_settings", fn)


def on_after_component(fn):
    _add("after_component", fn)


def on_app_started(fn):
    _add("app_started", fn)


def on_script_unloaded(fn):
    _add("script_unloaded", fn)


def on_model_loaded(fn):
    _add("model_loaded", fn)


def ui_tabs_callback():
    res = []
    for fn in callbacks["ui_tabs"]:
        res += fn() or []
    return res


def ui_settings_callback():
    for fn in callbacks["ui_settings"]:
        fn()


def after_component_callback(component, **kwargs):
    for fn in callbacks["after_component"]:
        fn(component, **kwargs)


def app_started_callback(demo, app):
    for fn in callbacks["app_started"]:
        fn(demo, app)


def model_loaded_callback(sd_model):
    for fn in callbacks["model_loaded"]:
        fn(sd_model)
