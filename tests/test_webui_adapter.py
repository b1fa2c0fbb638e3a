"""The WebUI adapter (scripts/rebasin_tab.py) and install.py against the stand-in host in tests/webui_standin/.

Covers: callback registration, settings, the checkpoint list, save -> refresh -> load calls, the top-left dropdown
updates, the hires-fix presets, interrupt (no partial file), GPU free/restore, and the HTTP API. Needs gradio
(any of 3.41.x / 4.x); merges run the real core on small synthetic checkpoints.
"""

from __future__ import annotations

import importlib.util
import json
import runpy
import sys
import time
from pathlib import Path

import pytest

gr = pytest.importorskip("gradio")

pytestmark = pytest.mark.ui

ROOT = Path(__file__).resolve().parents[1]
STANDIN = Path(__file__).resolve().parent / "webui_standin"
GR4 = int(gr.__version__.split(".")[0]) >= 4
ADAPTER_PACKAGES = ("modules", "modules_forge", "rebasin_webui")  # the stand-in host's, and the adapter's own


def _drop_standin_modules():
    """Forget the stand-in host and the adapter, its modules in scripts/rebasin_webui/ too (they import the host's)."""
    for name in list(sys.modules):
        if name.split(".")[0] in ADAPTER_PACKAGES or name in ("launch", "rebasin_tab.py"):
            del sys.modules[name]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    from model_cache import cached_checkpoint

    d = tmp_path_factory.mktemp("Stable-diffusion")
    cached_checkpoint(d / "alpha.safetensors", "tiny", seed=1, base_seed=0)
    cached_checkpoint(d / "beta.safetensors", "tiny", seed=2, base_seed=0)
    (d / "sub").mkdir()
    # Not a Stable Diffusion model at all: refused by preflight.
    import torch
    from safetensors.torch import save_file

    save_file({"foo.weight": torch.zeros(4, 4)}, str(d / "sub" / "notsd.safetensors"))
    return d


@pytest.fixture()
def webui(models_dir, tmp_path, monkeypatch):
    """Import scripts/rebasin_tab.py the way the WebUI does (by file path), with the stand-in `modules`."""
    _drop_standin_modules()
    monkeypatch.syspath_prepend(str(STANDIN))
    import modules
    from modules import call_queue, devices, hashes, sd_models, shared

    modules.CALLS.clear()
    shared.state.reset()
    shared.opts.data.clear()
    shared.opts.data["sd_model_checkpoint"] = None
    shared.cmd_opts.api = True  # tests of the API itself; the flag's effect is tested against a real server
    shared.config_filename = str(tmp_path / "config.json")
    hashes.caches.clear()
    sd_models.model_path = str(models_dir)
    sd_models.model_data.sd_model = None
    devices.optimal_device_name = "cpu"
    sd_models.list_models()
    # as the host's initialize(): choosing a checkpoint in the option reloads the model, inside the queue
    shared.opts.onchange("sd_model_checkpoint",
                         call_queue.wrap_queued_call(lambda: sd_models.reload_model_weights()), call=False)
    spec = importlib.util.spec_from_file_location("rebasin_tab.py", ROOT / "scripts" / "rebasin_tab.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.shared.opts.data["rebasin_output_dir"] = str(tmp_path)  # merges go to a per-test folder
    yield mod
    for job in list(mod.SERVICE.jobs.values()):
        mod.SERVICE.cancel(job.id)
        job.wait(60)
    for f in tmp_path.glob("*.safetensors"):
        f.unlink()
    _drop_standin_modules()


def _dropdown():
    """The adapter's module for the host's checkpoint dropdowns, as the loaded rebasin_tab.py imported it."""
    return sys.modules["rebasin_webui.dropdown"]


def _calls(prefix):
    import modules

    return [c for c in modules.CALLS if c[0].startswith(prefix)]


def _build_ui(webui, with_txt2img=True):
    """What the WebUI does at startup: settings, txt2img components, our tab, then the quicksettings row."""
    from modules import script_callbacks, shared

    script_callbacks.ui_settings_callback()
    comps = {}
    if with_txt2img:
        with gr.Blocks():
            comps["enable"] = gr.Checkbox(False, visible=False, elem_id="txt2img_hr-checkbox")
            upscalers = [*shared.latent_upscale_modes, *(u.name for u in shared.sd_upscalers)]  # as the host's
            comps["upscaler"] = gr.Dropdown(choices=upscalers, value="Latent", elem_id="txt2img_hr_upscaler")
            comps["steps"] = gr.Slider(0, 150, step=1, value=0, elem_id="txt2img_hires_steps")
            comps["denoise"] = gr.Slider(0, 1, step=0.01, value=0.7, elem_id="txt2img_denoising_strength")
            comps["scale"] = gr.Slider(1, 4, step=0.05, value=2.0, elem_id="txt2img_hr_scale")
            comps["prompt"] = gr.Textbox("a castle", elem_id="txt2img_prompt")
            # what the compare grid reads besides (modules/processing_scripts/seed.py, sampler.py, ui.py)
            comps["seed"] = gr.Number(-1, precision=0, elem_id="txt2img_seed")
            comps["width"] = gr.Slider(64, 2048, step=8, value=512, elem_id="txt2img_width")
            comps["height"] = gr.Slider(64, 2048, step=8, value=512, elem_id="txt2img_height")
            comps["sampling_steps"] = gr.Slider(1, 150, step=1, value=20, elem_id="txt2img_steps")
            comps["sampler"] = gr.Dropdown(choices=["Euler a", "DPM++ 2M"], value="Euler a",
                                           elem_id="txt2img_sampling")
            for c in comps.values():
                script_callbacks.after_component_callback(c, elem_id=c.elem_id)
    tabs = script_callbacks.ui_tabs_callback()
    with gr.Blocks() as demo:
        dd = gr.Dropdown(choices=[], elem_id="setting_sd_model_checkpoint")
        script_callbacks.after_component_callback(dd, elem_id="setting_sd_model_checkpoint", label="Stable Diffusion checkpoint")
        for blocks, _title, _id in tabs:
            blocks.render()
    return tabs, comps, dd, demo


def _deps(blocks):
    return blocks.get_config_file()["dependencies"]


def _dep_targets(dep):
    out = []
    for t in dep.get("targets", []):
        out.append(t[0] if isinstance(t, (list, tuple)) else t)
    return out


def _fn_for(blocks, component, event="click"):
    """(fn, dependency config) of the first `event` listener on `component` in `blocks`."""
    for i, dep in enumerate(_deps(blocks)):
        trigger = dep.get("trigger")
        targets = dep.get("targets", [])
        if component._id in _dep_targets(dep):
            if trigger is None and targets and isinstance(targets[0], (list, tuple)):
                trigger = targets[0][1]
            if trigger == event:
                return blocks.fns[i].fn, dep
    raise AssertionError(f"no {event} listener on {component}")


# -- registration ------------------------------------------------------------------------------------------------

def test_registers_callbacks_without_name_kwarg(webui):
    kinds = [c[0] for c in _calls("script_callbacks.on_")]
    assert sorted(kinds) == sorted(["script_callbacks.on_ui_settings", "script_callbacks.on_after_component",
                                    "script_callbacks.on_ui_tabs", "script_callbacks.on_app_started",
                                    "script_callbacks.on_model_loaded"])


def test_the_host_loads_one_script_and_the_adapter_modules_once(webui):
    """AUTOMATIC1111 and Forge load every *.py file directly in an extension's scripts/ folder as a script of its own,
    by file path (modules/scripts.py list_scripts, extensions.list_files), and never a folder: the adapter's other
    modules live in scripts/rebasin_webui/, imported by name. Loading rebasin_tab.py again (the host's UI reload)
    reuses them, and the host's functions stay wrapped once."""
    from modules import sd_models

    assert sorted(p.name for p in (ROOT / "scripts").glob("*.py")) == ["rebasin_tab.py"]
    unsaved = sys.modules["rebasin_webui.unsaved"]
    unsaved.keep_unsaved_listed(webui.HOST)
    wrapped = sd_models.list_models
    assert wrapped._rebasin_wrapper
    spec = importlib.util.spec_from_file_location("rebasin_tab.py", ROOT / "scripts" / "rebasin_tab.py")
    again = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(again)
    assert again.WebUIHost is webui.WebUIHost and sys.modules["rebasin_webui.unsaved"] is unsaved
    unsaved.keep_unsaved_listed(again.HOST)
    assert sd_models.list_models is wrapped  # not wrapped a second time


def test_tab_registration_and_settings(webui):
    tabs, _comps, _dd, _demo = _build_ui(webui)
    assert len(tabs) == 1
    blocks, title, elem_id = tabs[0]
    assert (title, elem_id) == ("Re-Basin", "rebasin")
    assert isinstance(blocks, gr.Blocks)
    labels = webui.shared.opts.data_labels
    for key in ("rebasin_default_method", "rebasin_default_iterations", "rebasin_default_device",
                "rebasin_default_precision", "rebasin_output_dir"):
        assert key in labels and labels[key].section == ("rebasin", "Re-Basin")
    assert labels["rebasin_default_method"].default == "rebasin"
    # human labels on the Settings page, the method's key stored
    choices = dict(labels["rebasin_default_method"].component_args["choices"])
    assert choices["Re-basin (weight matching)"] == "rebasin" and choices["Weighted sum"] == "weighted_sum"
    # in a category of the host's Settings page (modules/options.py lists a section without one as "Uncategorized")
    assert {labels[k].category_id for k in labels if k.startswith("rebasin_")} == {"sd"}


def test_settings_defaults_win_over_the_pinned_ui_config(webui, tmp_path):
    """ui-config.json pins what the tab showed on the first start; Settings -> Re-Basin must still decide."""
    from modules.ui_loadsave import UiLoadsave

    first = UiLoadsave(str(tmp_path / "ui-config.json"))
    _build_ui(webui, with_txt2img=False)
    first.add_block(webui.TAB.blocks, "rebasin")  # the host's first start writes ui-config.json
    first.dump()
    pinned = json.loads((tmp_path / "ui-config.json").read_text())
    pinned.update({"rebasin/Iterations/value": 1, "rebasin/Save precision/value": "fp16"})  # as a first start saves
    (tmp_path / "ui-config.json").write_text(json.dumps(pinned))
    webui.shared.opts.data.update(rebasin_default_method="legacy", rebasin_default_iterations=9,
                                  rebasin_default_precision="fp32")
    _build_ui(webui, with_txt2img=False)
    UiLoadsave(str(tmp_path / "ui-config.json")).add_block(webui.TAB.blocks, "rebasin")  # a later start
    ui = webui.TAB
    assert ui["iterations"].value == 9 and ui["precision"].value == "fp32"
    assert ui["method"].value == "Legacy (DunkMash tool compatible)"
    assert ui["recipe_precision"].value == "fp32"


def test_forge_rebuilt_dropdown_copies_are_not_wired(webui, monkeypatch, capsys):
    """gradio 4 builds a render=False copy of a component, outside any Blocks, for every update it sends; Forge's
    checkpoint dropdown gets one per page load and checkpoint switch, and the host's after_component hook fires."""
    from modules import script_callbacks, sd_models

    monkeypatch.setattr(sd_models, "forge_model_reload", lambda: None, raising=False)
    script_callbacks.ui_settings_callback()
    tabs = script_callbacks.ui_tabs_callback()
    kwargs = dict(label="Checkpoint", elem_classes=["model_selection"], choices=["alpha.safetensors"])
    with gr.Blocks() as demo:
        original = gr.Dropdown(**kwargs)
        script_callbacks.after_component_callback(original, **kwargs)
        for blocks, _title, _id in tabs:
            blocks.render()
    assert webui.HOST.checkpoint_dropdown is original
    _fn, dep = _fn_for(demo, webui.TAB["result_path"], "change")
    assert dep["outputs"] == [original._id]
    capsys.readouterr()
    for extra in ({"render": False}, {}):  # gradio 4's update copy; and any copy built outside a Blocks
        copy = gr.Dropdown(**kwargs, **extra)
        script_callbacks.after_component_callback(copy, **kwargs, **extra)
    out = capsys.readouterr()
    assert "Blocks context" not in out.err + out.out and "Traceback" not in out.err
    assert webui.HOST.checkpoint_dropdown is original


def test_settings_feed_tab_defaults(webui):
    data = webui.shared.opts.data
    data.update(rebasin_default_method="weighted_sum", rebasin_default_iterations=7,
                rebasin_default_precision="fp32", rebasin_default_device="cpu")
    d = webui.HOST.defaults()
    assert (d["method"], d["iterations"], d["precision"], d["device"]) == ("weighted_sum", 7, "fp32", "cpu")
    tabs, *_ = _build_ui(webui, with_txt2img=False)
    ui = webui.TAB
    assert ui["iterations"].value == 7
    assert ui["precision"].value == "fp32"


# -- checkpoints ------------------------------------------------------------------------------------------------

def test_checkpoint_list_comes_from_the_host(webui, models_dir):
    entries = webui.HOST.list_checkpoints()
    titles = [e.title for e in entries]
    assert titles == ["alpha.safetensors", "beta.safetensors", "sub/notsd.safetensors"]
    assert entries[0].path == models_dir / "alpha.safetensors"
    _build_ui(webui, with_txt2img=False)
    choices = [c[0] if isinstance(c, (list, tuple)) else c for c in webui.TAB["model_a"].choices]
    assert choices == titles


def test_output_folder_defaults_to_host_checkpoint_folder(webui, models_dir):
    webui.shared.opts.data["rebasin_output_dir"] = ""
    assert webui.HOST.output_dir() == models_dir
    webui.shared.cmd_opts.ckpt_dir = "/somewhere/else"
    try:
        assert webui.HOST.output_dir() == Path("/somewhere/else")
    finally:
        webui.shared.cmd_opts.ckpt_dir = None


def test_refresh_button_rescans_and_updates_all_dropdowns(webui):
    _build_ui(webui, with_txt2img=False)
    ui = webui.TAB
    fn, dep = _fn_for(ui.blocks, ui["refresh_a"])
    before = len(_calls("sd_models.list_models"))
    updates = fn("alpha.safetensors", "gone.safetensors", None)
    assert len(_calls("sd_models.list_models")) == before + 1
    assert set(dep["outputs"]) == {ui["model_a"]._id, ui["model_b"]._id, ui["model_c"]._id}
    assert updates[0]["value"] == "alpha.safetensors" and updates[1]["value"] is None
    assert "beta.safetensors" in updates[0]["choices"]


# -- validation -------------------------------------------------------------------------------------------------

def _request(**kw):
    from lib_rebasin.ui.request import MergeRequest

    base = dict(model_a="alpha.safetensors", model_b="beta.safetensors", method="rebasin", alpha=0.5,
                iterations=1, device="cpu", precision="fp16", output_name="merged")
    base.update(kw)
    return MergeRequest(**base)


@pytest.mark.parametrize("kw,needle", [
    (dict(model_b="alpha.safetensors"), "same file"),
    (dict(model_b="sub/notsd.safetensors"), ""),
    (dict(output_name="../escape"), "outside"),
    (dict(output_name="a/b"), "outside"),
    (dict(output_name="bad:name"), "not allowed"),
    (dict(output_name="x.ckpt"), "safetensors"),
    (dict(device="cuda:7"), "not available"),
    (dict(model_a=""), "Model A is not set"),
])
def test_bad_choices_are_refused_before_running(webui, kw, needle):
    from lib_rebasin.errors import RebasinError

    with pytest.raises(RebasinError) as e:
        webui.SERVICE.prepare(_request(**kw))
    assert needle.lower() in str(e.value).lower()
    assert not webui.SERVICE.jobs


def test_name_clash_is_refused(webui, tmp_path):
    from lib_rebasin.errors import RebasinError

    (tmp_path / "taken.safetensors").write_bytes(b"")
    with pytest.raises(RebasinError, match="already exists"):
        webui.SERVICE.prepare(_request(output_name="taken"))


def test_refused_merge_in_the_tab_shows_the_reason_and_clears_the_progress_task(webui):
    _build_ui(webui, with_txt2img=False)
    ui = webui.TAB
    fn, dep = _fn_for(ui.blocks, ui["merge"])
    assert dep.get("js") or dep.get("_js") or dep.get("frontend_fn")  # the requestProgress hook is attached
    frames = list(fn(ui.values(task_id="task(abc)", model_a="alpha.safetensors", model_b="alpha.safetensors",
                               device="cpu", precision="fp16", output_name="x")))
    assert len(frames) == 1
    assert "same file" in frames[0][0] and "rebasin-error" in frames[0][0]
    assert ("progress.finish_task", "task(abc)") in _calls("progress.finish_task")


# -- save -> refresh -> load ---------------------------------------------------------------------------------------

def test_merge_save_refresh_load(webui, tmp_path):
    from modules import sd_models, shared

    tabs, _comps, dd, demo = _build_ui(webui, with_txt2img=False)
    ui = webui.TAB
    fn, _dep = _fn_for(ui.blocks, ui["merge"])
    frames = list(fn(ui.values(task_id="task(m1)", model_a="alpha.safetensors", model_b="beta.safetensors",
                               device="cpu", precision="fp16", output_name="merged_one")))
    error, progress, result, result_path, load_btn, merge_btn, dd_a, _dd_b, _dd_c = frames[-1]
    assert error == ""
    out = tmp_path / "merged_one.safetensors"
    assert out.is_file() and result_path == str(out)
    assert "rebasin-done" in progress and "Done" in progress
    assert "merged_one.safetensors" in result
    assert load_btn.get("interactive") is True and merge_btn.get("interactive") is True
    # the host's hash cache got the inputs' and the output's sha256: titled "name [shorthash]" like the host's own
    from lib_rebasin.io.input_file import file_sha256

    short = file_sha256(out)[:10]
    merged_title = f"merged_one.safetensors [{short}]"
    alpha_title = f"alpha.safetensors [{file_sha256(sd_models.checkpoints_list[dd_a['value']].filename)[:10]}]"
    assert merged_title in dd_a["choices"] and dd_a["value"] == alpha_title  # the pick survives the new title
    assert any(f[5].get("interactive") is False for f in frames[:-1])  # Merge is disabled while it runs
    # ran inside the host's queue with its progress plumbing
    names = [c[0] for c in _calls("")]
    i_begin, i_end = names.index("state.begin"), names.index("state.end")
    assert names.index("progress.start_task") > i_begin and names.index("progress.finish_task") < i_end
    assert shared.state.history and shared.state.history[-1][0] is not None
    # saved, then the host's lists refreshed (output lies outside the scanned folder: registered by hand)
    assert any(Path(info.filename) == out for info in sd_models.checkpoints_list.values())
    upd = _dropdown().refresh_checkpoint_dropdown(str(out))
    assert merged_title in upd["choices"]
    fn_dd, dep_dd = _fn_for(demo, ui["result_path"], "change")
    assert dep_dd["outputs"] == [dd._id]
    # one-click load: the host reloads weights from the saved file and the top-left dropdown follows
    load_fn, _ = _fn_for(ui.blocks, ui["load"])
    status, title, page = load_fn(str(out))
    assert page == ""  # the adapter shows it in the captured dropdown; no second selection by the page
    assert title == merged_title and "Loaded" in status
    assert ("sd_models.reload_model_weights", merged_title) in _calls("sd_models.reload_model_weights")
    assert not _calls("hashes.calculate")  # the host did not hash the 2 GB file again to load it
    assert shared.opts.data["sd_model_checkpoint"] == merged_title
    assert sd_models.model_data.sd_model.sd_checkpoint_info.filename == str(out)
    # persisted the way the host's own checkpoint dropdown does it: the option set, config.json saved
    assert json.loads(Path(shared.config_filename).read_text())["sd_model_checkpoint"] == merged_title
    assert len(_calls("sd_models.reload_model_weights")) == 1  # the option's onchange found it loaded
    sel_fn, sel_dep = _fn_for(demo, ui["loaded_title"], "change")
    assert sel_dep["outputs"] == [dd._id]
    assert sel_fn(title)["value"] == merged_title


def _become_forge(monkeypatch):
    """The stand-in as Forge: modules_forge importable, sd_models with forge_model_reload and Forge's checkpoint
    tiles (bare names), and no reload on the option change (Forge loads lazily at the next generation)."""
    from modules import sd_models, shared

    monkeypatch.syspath_prepend(str(STANDIN / "forge"))
    monkeypatch.setattr(sd_models, "FORGE", True)
    monkeypatch.setattr(sd_models, "forge_model_reload", lambda: None, raising=False)
    shared.opts.onchanges.clear()


@pytest.fixture()
def forge(webui, monkeypatch):
    _become_forge(monkeypatch)
    return webui


def test_load_persists_the_choice_on_forge_through_its_checkpoint_change(forge):
    """Forge: "Load merged model" goes through modules_forge.main_entry.checkpoint_change, which sets the option,
    saves config.json and refreshes the loading parameters (the model loads lazily at the next generation). It gets
    what Forge's dropdown lists, the bare name, not the "name [hash]" title: else the dropdown shows nothing."""
    from modules import sd_models, shared

    info = sd_models.checkpoints_list["beta.safetensors"]
    info.calculate_shorthash()  # hashed, as after a merge or a load: titled "beta.safetensors [hash]"
    assert info.title != "beta.safetensors"
    title = forge.HOST.load_checkpoint(info.filename)
    assert _calls("main_entry.checkpoint_change") == [("main_entry.checkpoint_change", "beta.safetensors")]
    assert title == "beta.safetensors" and title in sd_models.checkpoint_tiles()
    assert json.loads(Path(shared.config_filename).read_text())["sd_model_checkpoint"] == "beta.safetensors"
    assert sd_models.model_data.forge_loading_parameters["checkpoint_info"].name == "beta.safetensors"


def _press_load(ui, demo, path):
    """What the browser does on "Load merged model": the click's Python handler, then (in any order, here the
    host dropdown first) the adapter's update of the host's checkpoint dropdown, whose change handler runs, and
    the page's selectCheckpoint() with whatever the JS hook is given. Returns the dropdown's last value."""
    from modules import ui_settings

    load_fn, load_dep = _fn_for(ui.blocks, ui["load"])
    values = dict(zip(load_dep["outputs"], load_fn(str(path))))
    shown = None
    sel_fn, _dep = _fn_for(demo, ui["loaded_title"], "change")
    upd = sel_fn(values[ui["loaded_title"]._id])
    if "value" in upd:
        shown = upd["value"]
        ui_settings.checkpoint_dropdown_changed(shown)
    hooks = [d for d in _deps(ui.blocks) if "selectCheckpoint" in str(d.get("js") or d.get("_js") or "")]
    # Load merged model, Merge & load (no file), Save this merge and the compare grid's Load this candidate: each
    # tells the page the same component's name
    assert len(hooks) == 4 and {tuple(h["inputs"]) for h in hooks} == {(ui["page_checkpoint"]._id,)}
    for comp_id in hooks[0]["inputs"]:
        if values.get(comp_id):
            shown = ui_settings.change_checkpoint(values[comp_id])
    return values[ui["load_status"]._id], shown


@pytest.mark.parametrize("flavour", ["a1111", "forge"])
@pytest.mark.parametrize("merged, inputs", [("fcore_F1F2", ("F1", "F2")), ("zz_F1", ("F1", "F2"))])
def test_load_selects_exactly_the_merged_file_whatever_its_name(webui, tmp_path, monkeypatch, flavour, merged,
                                                                 inputs):
    """A merge whose name contains an input's file name that is listed first ("fcore_F1F2" next to "F2", "zz_F1"
    next to "F1"): one load selects the merged file for the next generation, the option and config.json keep it,
    and the host's dropdown shows one of its own entries (Forge lists bare names, A1111 "name [hash]")."""
    from model_cache import cached_checkpoint
    from modules import sd_models, shared

    if flavour == "forge":
        _become_forge(monkeypatch)
    folder = tmp_path / "models"
    folder.mkdir()
    for i, name in enumerate(inputs):
        cached_checkpoint(folder / f"{name}.safetensors", "tiny", seed=i + 1, base_seed=0)
    sd_models.model_path = str(folder)
    webui.shared.opts.data["rebasin_output_dir"] = ""  # into the checkpoint folder, listed after the inputs
    sd_models.list_models()
    _tabs, _comps, _dd, demo = _build_ui(webui, with_txt2img=False)
    ui = webui.TAB
    fn, _dep = _fn_for(ui.blocks, ui["merge"])
    frames = list(fn(ui.values(task_id="task(m1)", model_a=f"{inputs[0]}.safetensors",
                               model_b=f"{inputs[1]}.safetensors", device="cpu", precision="fp16",
                               output_name=merged)))
    assert frames[-1][0] == ""
    out = folder / f"{merged}.safetensors"
    assert out.is_file() and list(sd_models.checkpoints_list.values())[-1].filename == str(out)
    status, shown = _press_load(ui, demo, out)
    assert "Loaded" in status
    chosen = shared.opts.data["sd_model_checkpoint"]
    assert sd_models.select_checkpoint().filename == str(out), chosen  # what the next generation loads
    if flavour == "a1111":
        assert sd_models.model_data.sd_model.sd_checkpoint_info.filename == str(out)
    assert shown == chosen and chosen in sd_models.checkpoint_tiles()  # the dropdown shows one of its entries
    assert json.loads(Path(shared.config_filename).read_text())["sd_model_checkpoint"] == chosen
    sd_models.list_models()  # a restart: the saved choice is still one of the dropdown's entries and that file
    assert chosen in sd_models.checkpoint_tiles() and sd_models.select_checkpoint().filename == str(out)


def test_merge_leaves_the_hosts_generation_progress_as_it_found_it(webui):
    """The merge drives the host's progress bar through shared.state (sampling_steps 1000), then puts those fields
    back: state.begin() of the next generation keeps sampling_steps, and the host's console "Total progress" bar,
    sized job_count * sampling_steps before the sampler sets its own, printed "0/1000"."""
    from modules import shared

    shared.state.sampling_steps, shared.state.sampling_step = 20, 20  # as a finished 20-step generation left them
    job = webui.SERVICE.submit(_request(output_name="progress_kept"))
    assert job.wait(120) and job.status == "done", job.error
    assert [s for s, _text in shared.state.history]  # the merge's progress went through the host's state
    assert (shared.state.sampling_steps, shared.state.sampling_step, shared.state.job_count) == (20, 20, 0)


def test_merge_saves_into_host_checkpoint_folder_and_lists_it(webui, models_dir):
    from modules import sd_models

    webui.shared.opts.data["rebasin_output_dir"] = ""
    job = webui.SERVICE.submit(_request(output_name="in_host_folder"))
    try:
        assert job.wait(300)
        assert job.status == "done", job.error
        assert job.output == models_dir / "in_host_folder.safetensors"
        assert "in_host_folder.safetensors" in {i.name for i in sd_models.checkpoints_list.values()}
        from safetensors import safe_open

        with safe_open(str(job.output), "pt") as f:
            meta = f.metadata()
        assert "sd_merge_recipe" in meta and "sd_merge_models" in meta
        json.loads(meta["sd_merge_recipe"])
    finally:
        if job.output and job.output.exists():
            job.output.unlink()
        sd_models.list_models()


# -- interrupt -------------------------------------------------------------------------------------------------

def test_interrupt_stops_cleanly_without_partial_file(webui, tmp_path):
    from modules import shared

    original = webui.HOST.report_progress
    seen = []

    def report(fraction, text):  # the user presses the WebUI's interrupt as soon as progress appears
        original(fraction, text)
        seen.append(text)
        if len(seen) == 1:
            webui.HOST.interrupt()

    webui.HOST.report_progress = report
    job = webui.SERVICE.submit(_request(output_name="stopped"), "task(stop1)")
    assert job.wait(300)
    assert job.status == "cancelled", (job.status, job.error)
    assert "no file" in job.status_line().lower()
    assert not list(tmp_path.glob("*stopped*")), list(tmp_path.iterdir())
    assert ("state.interrupt",) in _calls("state.interrupt")
    assert shared.state.interrupted is False  # reset for the next generation
    assert ("progress.finish_task", "task(stop1)") in _calls("progress.finish_task")


def test_stop_button_cancels_running_job(webui):
    _build_ui(webui, with_txt2img=False)
    ui = webui.TAB
    stop_fn, dep = _fn_for(ui.blocks, ui["stop"])
    assert dep.get("queue") is False  # runs even while the merge holds a worker
    assert "Nothing" in stop_fn()


def test_stop_while_queued_does_not_interrupt_someone_elses_job(webui):
    from modules import call_queue, shared

    with call_queue.queue_lock:  # a txt2img generation holds the GPU queue
        job = webui.SERVICE.submit(_request(output_name="queued"))
        time.sleep(0.3)
        assert job.status == "queued"
        webui.SERVICE.cancel(job.id)
        assert shared.state.interrupted is False
    assert job.wait(60)
    assert job.status == "cancelled"


# -- GPU memory -------------------------------------------------------------------------------------------------

def test_gpu_choice_frees_and_restores_vram(webui):
    from modules import devices, sd_models

    devices.optimal_device_name = "cuda:0"
    assert webui.HOST.device_choices() == ["cpu", "cuda:0"]
    webui.shared.cmd_opts.lowvram = True
    try:
        assert webui.HOST.default_device() == "cpu"
    finally:
        webui.shared.cmd_opts.lowvram = False
    info = sd_models.checkpoints_list["alpha.safetensors"]
    sd_models.model_data.sd_model = sd_models.FakeModel(info)
    webui.HOST.prepare_device("cuda:0")
    assert ("sd_models.send_model_to_cpu", "alpha.safetensors") in _calls("sd_models.send_model_to_cpu")
    webui.HOST.restore_device("cuda:0")
    assert ("sd_models.send_model_to_device", "alpha.safetensors") in _calls("sd_models.send_model_to_device")
    assert _calls("devices.torch_gc")
    modules_calls = len(_calls("sd_models."))
    webui.HOST.prepare_device("cpu")  # a CPU merge leaves the loaded model alone
    assert len(_calls("sd_models.")) == modules_calls


# -- hires-fix presets -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key,denoise", [("soft", 0.45), ("balanced", 0.55), ("strong", 0.70)])
def test_hires_presets_set_txt2img_from_python(webui, key, denoise):
    tabs, comps, _dd, _demo = _build_ui(webui)
    ui = webui.TAB
    assert set(webui.HOST.hires_targets()) == {"enable", "denoise", "scale", "upscaler", "steps"}
    fn, dep = _fn_for(ui.blocks, ui[f"preset_{key}"])
    order = ["enable", "denoise", "scale", "upscaler", "steps"]
    assert dep["outputs"][:5] == [comps[k]._id for k in order]
    assert comps["prompt"]._id not in dep["outputs"]  # the prompt is never touched
    assert dep["inputs"] == [comps["upscaler"]._id, ui["blocks_arch"]._id]  # the scale follows model A's architecture
    *updates, note = fn("Latent")
    values = [u.get("value") for u in updates]
    # a fresh install has R-ESRGAN 4x+ only as a download link: the preset picks one that runs right away
    assert values == [True, denoise, 2.0, "Lanczos", 0]
    assert f"{denoise:.2f}" in note and "**Lanczos**" in note and "nothing to download" in note
    # the skipped upscalers it names are the well-known ones the preset prefers, not the list's first downloads
    assert "R-ESRGAN 4x+ and ESRGAN\\_4x would need a download" in note and "DAT" not in note
    # a deliberate, existing non-latent upscaler is kept
    assert fn("Lanczos")[3]["value"] == "Lanczos"


def test_hires_preset_prefers_an_installed_esrgan_model(webui, tmp_path, monkeypatch):
    from modules import shared

    weights = tmp_path / "RealESRGAN_x4plus.pth"
    weights.write_bytes(b"weights")
    esrgan = shared.UpscalerData("R-ESRGAN 4x+", str(weights))  # what the host lists once the file is there
    monkeypatch.setattr(shared, "sd_upscalers", shared.sd_upscalers[:3] + [esrgan])
    _tabs, _comps, _dd, _demo = _build_ui(webui)
    fn, _dep = _fn_for(webui.TAB.blocks, webui.TAB["preset_soft"])
    *updates, note = fn("Latent")
    assert updates[3]["value"] == "R-ESRGAN 4x+" and "would need a download" not in note


def test_hires_presets_fall_back_to_js_when_txt2img_is_missing(webui):
    _build_ui(webui, with_txt2img=False)
    ui = webui.TAB
    fn, dep = _fn_for(ui.blocks, ui["preset_balanced"])
    js = dep.get("js") or dep.get("_js") or ""
    assert "rebasin_apply_hires(0.55" in js
    assert "0.55" in fn()


def test_advice_from_model_card_is_shown(webui):
    _build_ui(webui, with_txt2img=False)
    text = webui.TAB["hires_advice"].value
    assert "0.45" in text and "0.7" in text and "0.3" in text and "ControlNet Tile" in text


# -- HTTP API ---------------------------------------------------------------------------------------------------

def test_api_merge_progress_result_and_load(webui, tmp_path):
    from api_client import webui_api

    client = webui_api()
    r = client.post("/rebasin/v1/merge", json={"model_a": "alpha.safetensors", "model_b": "alpha.safetensors"})
    assert r.status_code == 400 and "same file" in r.json()["detail"]
    r = client.post("/rebasin/v1/merge", json={"model_a": "alpha.safetensors", "model_b": "beta.safetensors",
                                               "bogus": 1})
    assert r.status_code == 422 and r.json()["field"] == "bogus"
    r = client.post("/rebasin/v1/merge", json={"model_a": "alpha.safetensors", "model_b": "beta.safetensors",
                                               "output_name": "via_api", "iterations": 1, "parts": ["unet", "te", "vae"]})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    j = client.finished(job_id)
    assert j["status"] == "done", j
    assert j["output"] == str(tmp_path / "via_api.safetensors") and Path(j["output"]).is_file()
    assert j["fraction"] == 1.0 and isinstance(j["summary"], list)
    assert client.get("/rebasin/v1/jobs/nope").status_code == 404
    r = client.post("/rebasin/v1/load", json={"job_id": job_id})
    assert r.status_code == 200 and r.json()["loaded"].startswith("via_api.safetensors [")
    listed = {c["name"]: c for c in client.get("/rebasin/v1/checkpoints").json()}
    from lib_rebasin.io.input_file import file_sha256

    assert listed["via_api.safetensors"]["sha256"] == file_sha256(j["output"])


# -- install.py -------------------------------------------------------------------------------------------------

def test_install_py_installs_only_what_is_missing(monkeypatch):
    _drop_standin_modules()
    monkeypatch.syspath_prepend(str(STANDIN))
    import launch

    launch.calls.clear()
    launch.missing.clear()
    runpy.run_path(str(ROOT / "install.py"))
    assert not [c for c in launch.calls if c[0] == "run_pip"]
    launch.calls.clear()
    launch.missing.add("scipy")
    runpy.run_path(str(ROOT / "install.py"))
    pips = [c for c in launch.calls if c[0] == "run_pip"]
    assert len(pips) == 1 and "scipy" in pips[0][1] and "torch" not in pips[0][1]
    launch.missing.clear()
    _drop_standin_modules()


def test_the_standalone_app_loads_the_root_style_css(tmp_path):
    """One copy of the tab's CSS: the extension's root style.css, which the WebUI loads and the standalone app
    passes to its Blocks."""
    from lib_rebasin.ui.standalone import create_app

    blocks, _service, _host = create_app(tmp_path, devices=["cpu"])
    assert blocks.css == (ROOT / "style.css").read_text() and "#rebasin_error .rebasin-error" in blocks.css


def test_extension_js_defines_only_prefixed_globals():
    import re

    js = (ROOT / "javascript" / "rebasin.js").read_text()
    names = re.findall(r"^function\s+(\w+)", js, flags=re.M)
    assert names and all(n.startswith("rebasin_") for n in names)
    assert "onUiLoaded(" in js and "onUiUpdate(" not in js


def test_recipe_runs_in_the_webui_queue_and_saves_to_the_output_folder(webui, tmp_path, models_dir):
    """A 2-step recipe from the tab's builder, run by the WebUI host: models found in the host's checkpoint
    lists (not the output folder), the host's queue and progress, then its lists rescanned."""
    from lib_rebasin.recipe.parse import parse_recipe
    from lib_rebasin.ui import recipe_builder as rb
    from lib_rebasin.ui.request import RecipeRequest

    _build_ui(webui, with_txt2img=False)
    entries = webui.SERVICE.checkpoints()
    text = rb.add_step("", rb.StepForm("rebasin", "alpha.safetensors", "beta.safetensors", parts=("te", "vae")),
                       entries)
    text = rb.add_step(text, rb.StepForm("weighted_sum", "[step] step1", "alpha.safetensors", alpha=0.3,
                                         parts=("te", "vae")), entries)
    job = webui.SERVICE.submit_recipe(RecipeRequest(text, "webui_chain"), "task(recipe1)")
    assert job.wait(120) and job.status == "done", job.error
    assert job.output == tmp_path / "webui_chain.safetensors" and job.output.is_file()
    assert ("progress.start_task", "task(recipe1)") in _calls("progress.start_task")
    assert [s.name for s in parse_recipe(rb.from_checkpoint(job.output)).steps] == ["step1", "step2"]
    titles = _dropdown().refresh_checkpoint_dropdown(str(job.output))["choices"]
    assert any(t.startswith("webui_chain.safetensors [") for t in titles)  # titled with its hash, like the host
