""""Merge & load (no file)" and "Save this merge" through the WebUI adapter, against the stand-in host
(tests/webui_standin/): the host's load_model with an already-loaded state dict and a checkpoint info that names no
file, the next generation's reload finding it loaded, the save writing the direct merge's bytes, a switch to another
checkpoint discarding it, failures keeping the model before, the tab's buttons and the HTTP API."""

from __future__ import annotations

from pathlib import Path

import pytest
import test_webui_adapter as adapter_tests
from test_webui_adapter import _become_forge, _build_ui, _calls, _dropdown, _fn_for

from lib_rebasin.errors import RebasinError
from lib_rebasin.merge.run import merge_checkpoints
from lib_rebasin.ui.request import MergeRequest

pytestmark = pytest.mark.ui

models_dir, webui = adapter_tests.models_dir, adapter_tests.webui  # the adapter's fixtures

LABEL = "alpha + beta, re-basin, alpha 0.35, unsaved"


def _load(mod, **kw):
    req = MergeRequest(model_a="alpha.safetensors", model_b="beta.safetensors", method="rebasin", alpha=0.35,
                       device="cpu", **kw)
    job = mod.SERVICE.submit_load(req)
    assert job.wait(120)
    return job


def _direct(mod, tmp_path, name="direct.safetensors", **kw):
    from modules import sd_models

    a = Path(sd_models.model_path) / "alpha.safetensors"
    b = Path(sd_models.model_path) / "beta.safetensors"
    opts = MergeRequest(model_a="alpha.safetensors", model_b="beta.safetensors", method="rebasin", alpha=0.35,
                        device="cpu", **kw).options()
    out = tmp_path / "direct" / name
    out.parent.mkdir(exist_ok=True)
    merge_checkpoints(a, b, out, opts, extra_metadata={"lib_rebasin_host": mod.HOST.name})
    return out.read_bytes()


def test_merge_load_puts_the_merge_into_the_host_without_a_file(webui, tmp_path):
    from modules import sd_models, shared

    shared.opts.set("sd_model_checkpoint", "alpha.safetensors")  # a model from a file is loaded first
    before = sd_models.model_data.sd_model
    job = _load(webui)
    assert job.status == "done", job.error
    assert job.loaded == LABEL and job.to_dict()["kind"] == "load"
    assert not list(tmp_path.glob("*.safetensors"))  # nothing written
    model = sd_models.model_data.sd_model
    assert model.sd_checkpoint_info.title == LABEL and model.sd_model_hash is None
    assert before.device == "meta" and before not in sd_models.model_data.loaded_sd_models
    assert shared.opts.data["sd_model_checkpoint"] == LABEL
    assert not Path(model.sd_model_checkpoint).exists()
    assert _calls("sd_models.load_model")[-1] == ("sd_models.load_model", LABEL, True)
    # the next generation's reload (processing.process_images) finds it loaded: nothing read from disk
    n = len(_calls("sd_models.reload_model_weights"))
    assert sd_models.reload_model_weights() is model
    assert len(_calls("sd_models.reload_model_weights")) == n
    sd_models.list_models()  # a refresh button: the unsaved merge stays selectable
    assert sd_models.select_checkpoint() is model.sd_checkpoint_info
    assert webui.SERVICE.unsaved.current.title == LABEL


def test_save_writes_the_direct_merges_bytes_and_becomes_a_normal_checkpoint(webui, tmp_path):
    from modules import sd_models, shared

    _load(webui)
    model = sd_models.model_data.sd_model
    path, title = webui.SERVICE.save_unsaved("", False)
    assert path == tmp_path / "alpha_beta_rebasin_0.35.safetensors"
    assert path.read_bytes() == _direct(webui, tmp_path)  # tensors and metadata, bit for bit
    assert sd_models.model_data.sd_model is model  # not loaded again
    info = model.sd_checkpoint_info
    assert Path(info.filename) == path and info.shorthash and title == info.title
    assert shared.opts.data["sd_model_checkpoint"] == title
    assert LABEL not in sd_models.checkpoints_list and webui.SERVICE.unsaved.current is None
    n = len(_calls("sd_models.reload_model_weights"))
    sd_models.reload_model_weights()
    assert len(_calls("sd_models.reload_model_weights")) == n  # it is that file: nothing to reload


def test_save_refuses_an_existing_name_and_keeps_the_merge(webui, tmp_path):
    from lib_rebasin.errors import RebasinError

    _load(webui)
    (tmp_path / "taken.safetensors").write_bytes(b"x")
    with pytest.raises(RebasinError, match="already exists"):
        webui.SERVICE.save_unsaved("taken", False)
    assert (tmp_path / "taken.safetensors").read_bytes() == b"x"
    assert webui.SERVICE.unsaved.current is not None
    path, _ = webui.SERVICE.save_unsaved("mine", False)
    assert path.name == "mine.safetensors"


def test_picking_another_checkpoint_discards_the_unsaved_merge(webui):
    from modules import sd_models, shared

    _load(webui)
    held = webui.SERVICE.unsaved.current.held
    shared.opts.set("sd_model_checkpoint", "beta.safetensors")  # the host's dropdown
    assert sd_models.model_data.sd_model.sd_checkpoint_info.name == "beta.safetensors"
    assert webui.SERVICE.unsaved.current is None and held.released and not held.tensors
    assert LABEL not in sd_models.checkpoints_list and LABEL not in sd_models.checkpoint_aliases
    assert webui.HOST._unsaved is None


def test_at_most_one_unsaved_merge_is_held(webui):
    from modules import sd_models

    _load(webui)
    first = webui.SERVICE.unsaved.current
    _load(webui)
    assert first.held.released and webui.SERVICE.unsaved.current is not first
    assert [t for t in sd_models.checkpoints_list if t.endswith("unsaved")] == [LABEL]


def test_a_failed_host_load_is_one_line_and_keeps_the_model_before(webui):
    from modules import sd_models, shared

    shared.opts.set("sd_model_checkpoint", "alpha.safetensors")
    sd_models.LOAD_FAILS.append(RuntimeError("Cannot copy out of meta tensor"))
    job = _load(webui)
    assert job.status == "failed" and "\n" not in job.error
    assert "could not load the merge" in job.error and "alpha.safetensors" in job.error
    model = sd_models.model_data.sd_model
    assert model.sd_checkpoint_info.name == "alpha.safetensors" and model.device != "meta"
    assert shared.opts.data["sd_model_checkpoint"].startswith("alpha.safetensors")
    assert not [t for t in sd_models.checkpoints_list if t.endswith("unsaved")]
    assert webui.SERVICE.unsaved.current is None


def test_bad_input_is_refused_before_anything_runs(webui):
    from lib_rebasin.errors import RebasinError

    with pytest.raises(RebasinError, match="Model A is not set"):
        webui.SERVICE.submit_load(MergeRequest(model_a="", model_b="beta.safetensors", device="cpu"))
    with pytest.raises(RebasinError, match="No unsaved merge"):
        webui.SERVICE.save_unsaved("", False)
    assert not _calls("sd_models.load_model")


def _forge_with_reader(monkeypatch):
    """The stand-in as Forge with backend.loader's reader and a forge_model_reload that loads what the loading
    parameters select at the next generation (unchanged parameters: no reload). Returns (reload, files read)."""
    import sys
    import types

    from modules import sd_models

    _become_forge(monkeypatch)
    loader = types.ModuleType("backend.loader")
    read = []
    loader.load_torch_file = lambda ckpt, *a, **k: read.append(ckpt) or {}
    backend = types.ModuleType("backend")
    backend.loader = loader
    monkeypatch.setitem(sys.modules, "backend", backend)
    monkeypatch.setitem(sys.modules, "backend.loader", loader)
    sd_models.model_data.forge_hash = ""

    def forge_model_reload():
        params = str(sd_models.model_data.forge_loading_parameters)
        if sd_models.model_data.forge_hash == params:
            return sd_models.model_data.sd_model, False
        info = sd_models.model_data.forge_loading_parameters["checkpoint_info"]
        sd = sys.modules["backend.loader"].load_torch_file(info.filename)
        model = sd_models.FakeModel(info)
        model.weights = sd
        model.sd_model_hash = info.calculate_shorthash()
        sd_models.model_data.sd_model = model
        sd_models.model_data.forge_hash = params
        from modules import script_callbacks

        script_callbacks.model_loaded_callback(model)
        return model, True

    monkeypatch.setattr(sd_models, "forge_model_reload", forge_model_reload, raising=False)
    return forge_model_reload, read


def test_forge_loads_through_its_own_reader_and_keeps_it_at_the_next_generation(webui, monkeypatch):
    """Forge: forge_model_reload loads what sd_model_checkpoint selects, reading it with backend.loader's
    load_torch_file; the adapter's reader gives the unsaved dict for its name. Unchanged loading parameters at the
    next generation mean no reload."""
    from modules import sd_models, shared

    forge_model_reload, read = _forge_with_reader(monkeypatch)
    job = _load(webui)
    assert job.status == "done", job.error
    model = sd_models.model_data.sd_model
    assert model.sd_checkpoint_info.title == LABEL and model.weights and not read
    assert shared.opts.data["sd_model_checkpoint"] == LABEL
    assert forge_model_reload() == (model, False)
    # the page may select it: Forge's match_checkpoint_to_name maps the label to itself
    assert webui.HOST.page_name_for(LABEL) == LABEL
    path, title = webui.SERVICE.save_unsaved("", False)
    assert title == path.name and sd_models.model_data.sd_model is model
    assert forge_model_reload() == (model, False)  # adopted: its loading parameters are the saved file's


def test_forge_lets_the_unsaved_merge_go_when_another_checkpoint_is_picked(webui, monkeypatch):
    """Forge loads a picked checkpoint only at the next generation (on_model_loaded comes then). The unsaved merge
    is let go at the pick itself: else a compare would take it for the model before and load it back after Stop,
    undoing the pick (seen in a real Forge)."""
    from modules import sd_models, shared

    forge_model_reload, read = _forge_with_reader(monkeypatch)
    from modules_forge import main_entry
    job = _load(webui)
    assert job.status == "done", job.error
    assert webui.HOST.loaded_checkpoint() is None  # the unsaved merge is what generates now
    assert main_entry.checkpoint_change("alpha.safetensors")  # Forge's dropdown (and /sdapi/v1/options)
    assert sd_models.model_data.sd_model.sd_checkpoint_info.title == LABEL  # nothing reloaded yet
    assert webui.HOST.loaded_checkpoint() == Path(sd_models.model_path) / "alpha.safetensors"
    assert LABEL not in sd_models.checkpoints_list and LABEL not in sd_models.checkpoint_aliases
    with pytest.raises(RebasinError, match="No unsaved merge"):
        webui.SERVICE.save_unsaved("", False)
    model, reloaded = forge_model_reload()  # the next generation loads the pick from its file
    assert reloaded and model.sd_checkpoint_info.filename.endswith("alpha.safetensors")
    assert read == [model.sd_checkpoint_info.filename]
    assert shared.opts.data["sd_model_checkpoint"] == "alpha.safetensors"


def test_the_standalone_host_has_no_generator():
    from lib_rebasin.errors import RebasinError
    from lib_rebasin.ui.host import BaseHost
    from lib_rebasin.ui.service import MergeService

    host = BaseHost()
    assert not host.loads_in_memory
    with pytest.raises(RebasinError, match="no image generator"):
        MergeService(host).submit_load(MergeRequest(model_a="a", model_b="b", device="cpu"))


def test_tab_buttons_load_and_save(webui, tmp_path):
    _build_ui(webui)
    ui = webui.TAB
    assert ui["merge_load"].interactive is not False
    fn, dep = _fn_for(ui.blocks, ui["merge_load"])
    values = ui.values(model_a="alpha.safetensors", model_b="beta.safetensors", alpha=0.35, device="cpu")
    frames = list(fn(values))
    last = dict(zip(dep["outputs"], frames[-1], strict=True))
    out = {name: last[ui[name]._id] for name in ("unsaved_status", "loaded_title", "page_checkpoint", "result")}
    assert LABEL in out["unsaved_status"] and out["loaded_title"] == LABEL
    assert out["page_checkpoint"] == ""  # the host's dropdown was captured: the adapter shows the label in it
    shown = _dropdown().select_in_checkpoint_dropdown(out["loaded_title"])
    assert shown["value"] == LABEL and LABEL in shown["choices"]
    assert "Loaded without saving" in out["result"]
    save_fn, save_dep = _fn_for(ui.blocks, ui["save_unsaved"])
    status = dict(zip(save_dep["outputs"], save_fn("", False), strict=True))
    assert "Saved" in status[ui["load_status"]._id]
    assert (tmp_path / "alpha_beta_rebasin_0.35.safetensors").exists()


def test_api_merge_load_loaded_and_save(webui, tmp_path):
    from api_client import webui_api

    client = webui_api()
    assert client.get("/rebasin/v1/loaded").json() == {"unsaved": None}
    r = client.post("/rebasin/v1/save-loaded", json={})
    assert r.status_code == 400 and "No unsaved merge" in r.json()["detail"]
    r = client.post("/rebasin/v1/merge-load", json={"model_a": "alpha.safetensors", "model_b": "beta.safetensors",
                                                    "method": "rebasin", "alpha": 0.35, "device": "cpu"})
    assert r.status_code == 202 and r.json()["kind"] == "load"
    webui.SERVICE.jobs[r.json()["job_id"]].wait(120)
    job = client.get(f"/rebasin/v1/jobs/{r.json()['job_id']}").json()
    assert job["status"] == "done" and job["loaded"] == LABEL
    assert client.get("/rebasin/v1/loaded").json()["unsaved"]["label"] == LABEL
    r = client.post("/rebasin/v1/save-loaded", json={"output_name": "api_saved", "overwrite": "yes"})
    assert r.status_code == 422 and r.json()["field"] == "overwrite"
    r = client.post("/rebasin/v1/save-loaded", json={"output_name": "api_saved"})
    assert r.status_code == 200 and r.json()["output_name"] == "api_saved.safetensors"
    assert (tmp_path / "api_saved.safetensors").read_bytes() == _direct(webui, tmp_path)
    r = client.post("/rebasin/v1/merge-load", json={"model_b": "beta.safetensors", "device": "cpu"})
    assert r.status_code in (400, 422) and "Model A" in r.json()["detail"]


def test_stop_keeps_the_model_loaded_before(webui):
    from modules import sd_models, shared

    shared.opts.set("sd_model_checkpoint", "alpha.safetensors")
    before = sd_models.model_data.sd_model
    req = MergeRequest(model_a="alpha.safetensors", model_b="beta.safetensors", method="rebasin", alpha=0.35,
                       device="cpu")
    job = webui.SERVICE.submit_load(req)
    webui.SERVICE.cancel(job.id)
    assert job.wait(120)
    assert job.status == "cancelled" and job.status_line() == "Stopped: the model loaded before is kept."
    assert sd_models.model_data.sd_model is before and before.device != "meta"
    assert webui.SERVICE.unsaved.current is None and not _calls("sd_models.load_model")
