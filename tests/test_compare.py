"""The compare grid through the WebUI adapter, against the stand-in host (tests/webui_standin/): one candidate per
value, merged in memory with one match, loaded, generated with one seed; the labelled grid saved where txt2img
saves grids; Stop between and inside a candidate giving back the model loaded before; Load and Save of a candidate
(the direct merge's bytes); bad input refused in one line with the model before still working; the HTTP API."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import test_webui_adapter as adapter_tests
from same_bytes import file_holds, held_checkpoint
from test_webui_adapter import _calls

from lib_rebasin.errors import FieldError, RebasinError
from lib_rebasin.merge.held import merge_held
from lib_rebasin.ui.compare import submit_compare
from lib_rebasin.ui.request import MergeRequest

pytestmark = pytest.mark.ui

webui = adapter_tests.webui  # the adapter's fixture, over the folder below


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """The adapter's two models (test_webui_adapter.models_dir) without their VAE, from the model cache: what is
    tested is the grid, the stops, and that a saved candidate is the direct merge, and every candidate saved is
    then half the bytes. The stand-in's pictures take their colour from the text encoder's first keys, as before."""
    from model_cache import cached_checkpoint, cached_without_parts

    full, d = tmp_path_factory.mktemp("with_vae"), tmp_path_factory.mktemp("Stable-diffusion")
    for name, seed in (("alpha", 1), ("beta", 2)):
        cached_without_parts(d / f"{name}.safetensors",
                             cached_checkpoint(full / f"{name}.safetensors", "tiny", seed=seed, base_seed=0), ("vae",))
    return d

GEN = {"prompt": "a castle", "negative_prompt": "blurry", "seed": 1234, "width": 64, "height": 64, "steps": 3,
       "enable_hr": True, "hr_scale": 1.5, "denoising_strength": 0.5}


def _body(**kw):
    return {"model_a": "alpha.safetensors", "model_b": "beta.safetensors", "method": "rebasin", "device": "cpu",
            "axis": "alpha", "values": "0.2, 0.5, 0.8", "generation": dict(GEN), **kw}


def _grids_dir(tmp_path, webui):
    folder = tmp_path / "txt2img-grids"
    webui.shared.opts.data["outdir_txt2img_grids"] = str(folder)
    return folder


def _load_file(webui, name="alpha.safetensors"):
    from modules import shared

    shared.opts.set("sd_model_checkpoint", name)  # the host loads it (its onchange reload)
    from modules import sd_models

    return sd_models.model_data.sd_model


def _run(webui, **kw):
    job = submit_compare(webui.SERVICE, _body(**kw))
    assert job.wait(300)
    return job


def _is_direct(path, alpha, **kw) -> bool:
    """The file at `path` holds what the direct merge at `alpha` writes with the WebUI's metadata (held in memory:
    `merge_held` is the file `merge_checkpoints` writes, test_held_merge.py)."""
    from modules import sd_models

    a = Path(sd_models.model_path) / "alpha.safetensors"
    b = Path(sd_models.model_path) / "beta.safetensors"
    opts = MergeRequest(model_a="alpha.safetensors", model_b="beta.safetensors", method="rebasin", alpha=alpha,
                        device="cpu", **kw).options()
    direct = merge_held(a, b, opts, extra_metadata={"lib_rebasin_host": "webui"})
    return file_holds(path, held_checkpoint(direct))


def test_grid_over_alphas_one_match_one_seed_labelled_and_saved_with_parameters(webui, tmp_path):
    from PIL import Image

    grids = _grids_dir(tmp_path, webui)
    before = _load_file(webui)
    seen = []
    report = webui.HOST.report_progress

    def progress(fraction, text):
        seen.append((fraction, text))
        report(fraction, text)

    webui.HOST.report_progress = progress
    job = _run(webui)
    assert job.status == "done", job.error
    d = job.to_dict()
    assert d["kind"] == "compare" and d["seed"] == 1234 and d["done"] == 3
    grid = Path(d["grid"])
    assert grid.parent == grids and grid.is_file()
    # each cell 96x96 (hires x1.5) under a label band, in one row
    with Image.open(grid) as im:
        assert im.width == 3 * 96 and im.height > 96
        params = im.info["parameters"]
    assert "Seed: 1234" in params and "Re-Basin compare: alpha = alpha 0.2, alpha 0.5, alpha 0.8" in params
    labels = [c["label"] for c in d["candidates"]]
    assert labels == [f"alpha + beta, re-basin, alpha {a}, unsaved" for a in ("0.2", "0.5", "0.8")]
    for c in d["candidates"]:
        assert f"Model: {c['label']}" in c["infotext"] and f"Re-Basin candidate: {c['label']}" in c["infotext"]
        assert "Seed: 1234" in c["infotext"] and "Hires upscale: 1.5" in c["infotext"]
    # three different pictures, from three different models: the cells differ
    with Image.open(grid) as im:
        colours = {im.getpixel((x * 96 + 48, im.height - 5)) for x in range(3)}
    assert len(colours) == 3
    # one match for the pair, reused by every candidate
    firsts = {id(c.prepared.first) for c in job.compare.candidates}
    assert len(firsts) == 1 and job.compare.candidates[0].prepared.first.runs == 1
    # progress per candidate and per picture, in order
    texts = [t for _, t in seen]
    for i, a in enumerate(("0.2", "0.5", "0.8")):
        assert any(t.startswith(f"alpha {a} ({i + 1}/3): generating") for t in texts)
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) or max(fractions) == 1.0
    # the file loaded before is loaded again, and generates
    from modules import processing, sd_models

    model = sd_models.model_data.sd_model
    assert model.sd_checkpoint_info.title.startswith("alpha.safetensors") and model is not before
    assert "loaded again" in job.status_line()
    p = processing.StableDiffusionProcessingTxt2Img(prompt="x", width=64, height=64, steps=2, seed=1)
    assert processing.process_images(p).images


def test_stop_inside_a_candidate_restores_the_model_before(webui, tmp_path):
    from modules import processing, sd_models

    grids = _grids_dir(tmp_path, webui)
    _load_file(webui)
    processing.STEP_SECONDS[0] = 0.2
    try:
        job = submit_compare(webui.SERVICE, _body(generation={**GEN, "steps": 50}))

        def stop_when_generating():
            deadline = time.time() + 120
            while time.time() < deadline and not _calls("processing.process_images"):
                time.sleep(0.05)
            time.sleep(0.3)
            webui.SERVICE.cancel(job.id)

        seen_at_end = []

        def watch_for_the_end():  # what a client polling the job sees the moment it shows its end
            deadline = time.time() + 300
            while time.time() < deadline and job.status not in ("done", "cancelled", "failed"):
                time.sleep(0.01)
            seen_at_end.append((sd_models.model_data.sd_model.sd_checkpoint_info.title, job.status_line()))

        threading.Thread(target=stop_when_generating, daemon=True).start()
        watcher = threading.Thread(target=watch_for_the_end, daemon=True)
        watcher.start()
        assert job.wait(300)
        watcher.join(10)
    finally:
        processing.STEP_SECONDS[0] = 0.0
    assert job.status == "cancelled", job.to_dict()
    # the file before is loaded again before the job shows it was stopped, and its line says so
    assert seen_at_end and seen_at_end[0][0].startswith("alpha.safetensors"), seen_at_end
    assert "loaded again" in seen_at_end[0][1], seen_at_end
    assert job.done == 0 and len(_calls("processing.process_images")) == 1
    assert not grids.exists() or not list(grids.iterdir())  # no grid from a stopped run
    model = sd_models.model_data.sd_model
    assert model.sd_checkpoint_info.title.startswith("alpha.safetensors")
    assert "Stopped after 0 of 3" in job.status_line() and "loaded again" in job.status_line()
    assert webui.shared.state.interrupted is False  # the host's next generation is not interrupted
    p = processing.StableDiffusionProcessingTxt2Img(prompt="x", width=64, height=64, steps=2, seed=1)
    assert processing.process_images(p).images


def test_stop_between_candidates_and_an_unsaved_merge_held_before_comes_back(webui, tmp_path):
    from modules import sd_models

    _grids_dir(tmp_path, webui)
    load = webui.SERVICE.submit_load(MergeRequest(model_a="alpha.safetensors", model_b="beta.safetensors",
                                                  method="weighted_sum", alpha=0.3, device="cpu"))
    assert load.wait(120) and load.status == "done"
    held = webui.SERVICE.unsaved.current
    report = webui.HOST.report_progress

    def stop_after_the_first(fraction, text):
        report(fraction, text)
        if text.endswith("(1/3): done"):  # the first picture is finished: Stop between candidates
            webui.SERVICE.cancel()

    webui.HOST.report_progress = stop_after_the_first
    job = _run(webui)
    assert job.status == "cancelled" and job.done == 1
    assert len(_calls("processing.process_images")) == 1
    assert webui.SERVICE.unsaved.current is held and not held.held.released
    assert sd_models.model_data.sd_model.sd_checkpoint_info.title == held.label
    assert "is loaded again" in job.status_line()
    path, _title = webui.SERVICE.save_unsaved("kept_unsaved", False)  # still savable
    assert path.is_file()


def test_load_and_save_a_candidate_reuse_the_match_and_write_the_direct_bytes(webui, tmp_path):
    from lib_rebasin.ui.compare import candidate_of, load_candidate, save_candidate

    _grids_dir(tmp_path, webui)
    _load_file(webui)
    job = _run(webui)
    assert job.status == "done", job.error
    cand = candidate_of(webui.SERVICE, job.id, 1)
    saved = save_candidate(webui.SERVICE, cand, "picked")
    assert saved.wait(120) and saved.status == "done", saved.error
    assert _is_direct(saved.output, 0.5)
    assert cand.prepared.first.runs == 1  # no second match
    loaded = load_candidate(webui.SERVICE, candidate_of(webui.SERVICE, None, 2))
    assert loaded.wait(120) and loaded.status == "done", loaded.error
    assert loaded.loaded == "alpha + beta, re-basin, alpha 0.8, unsaved"
    path, _ = webui.SERVICE.save_unsaved("picked_08", False)
    assert _is_direct(path, 0.8)
    with pytest.raises(FieldError, match="index"):
        candidate_of(webui.SERVICE, job.id, 3)


def test_method_and_block_preset_axes(webui, tmp_path):
    from lib_rebasin.merge.block_presets import PRESETS
    from lib_rebasin.ui.compare import candidate_of, save_candidate

    _grids_dir(tmp_path, webui)
    _load_file(webui)
    job = _run(webui, axis="method", values=["rebasin", "weighted_sum"], alpha=0.4)
    assert job.status == "done", job.error
    assert [c.value for c in job.compare.candidates] == ["Re-Basin (weight matching)", "Weighted sum"] or \
        len({c.value for c in job.compare.candidates}) == 2
    assert len({id(c.prepared.first) for c in job.compare.candidates}) == 2  # each method its own
    presets = list(PRESETS)[:2]
    job = _run(webui, axis="blocks", values=presets, alpha=0.4)
    assert job.status == "done", job.error
    assert [c.value for c in job.compare.candidates] == [f"blocks {p}" for p in presets]
    saved = save_candidate(webui.SERVICE, candidate_of(webui.SERVICE, job.id, 1), "blk")
    assert saved.wait(120) and saved.status == "done", saved.error
    assert _is_direct(saved.output, 0.4, blocks=presets[1])


@pytest.mark.parametrize("kw, field, needle", [
    ({"model_a": None}, None, "Model A is not set"),
    ({"values": "0.2, x, 0.8"}, "values", "value 2 of 3: 'x' is not a number"),
    ({"values": "0.2, 1.7"}, "alpha", "alpha 1.7"),
    ({"values": ",".join(str(i / 20) for i in range(13))}, "values", "at most 12 values"),
    ({"values": "0.2, 0.2"}, "values", "listed twice"),
    ({"axis": "seed"}, "axis", "must be one of alpha, method, blocks"),
    ({"generation": {**GEN, "width": 2048, "height": 2048, "hr_scale": 4.0}}, "generation", "million"),
    ({"generation": {**GEN, "steps": 0}}, "generation.steps", "between 1 and 150"),
    ({"generation": {**GEN, "bogus": 1}}, "generation.bogus", "Unknown txt2img setting"),
])
def test_bad_input_is_one_line_and_the_model_keeps_working(webui, tmp_path, kw, field, needle):
    from modules import processing, sd_models

    _load_file(webui)
    model = sd_models.model_data.sd_model
    body = _body(**kw)
    if kw.get("model_a", "") is None:
        body.pop("model_a")
    with pytest.raises(RebasinError) as e:
        submit_compare(webui.SERVICE, body)
    assert needle in str(e.value) and "\n" not in str(e.value)
    if field is not None:
        assert isinstance(e.value, FieldError) and e.value.field == field
    assert sd_models.model_data.sd_model is model and not webui.SERVICE.jobs
    p = processing.StableDiffusionProcessingTxt2Img(prompt="x", width=64, height=64, steps=2, seed=1)
    assert processing.process_images(p).images


def test_the_tab_compares_with_txt2img_settings_then_loads_and_saves_a_candidate(webui, tmp_path):
    from PIL import Image
    from test_webui_adapter import _build_ui, _fn_for

    grids = _grids_dir(tmp_path, webui)
    _load_file(webui)
    _tabs, comps, _dd, _demo = _build_ui(webui)
    ui = webui.TAB
    assert set(webui.HOST.txt2img_inputs()) >= {"prompt", "seed", "width", "height", "steps", "sampler_name",
                                                "enable_hr", "hr_scale", "hr_upscaler", "denoising_strength",
                                                "hr_second_pass_steps"}
    fn, dep = _fn_for(ui.blocks, ui["compare_run"])
    values = ui.values(model_a="alpha.safetensors", model_b="beta.safetensors", device="cpu",
                       compare_values="0.25, 0.75")
    values.update({comps["prompt"]: "a red barn", comps["seed"]: 77.0, comps["width"]: 64, comps["height"]: 64,
                   comps["sampling_steps"]: 2, comps["sampler"]: "DPM++ 2M", comps["enable"]: True,
                   comps["scale"]: 2.0, comps["upscaler"]: "Lanczos", comps["denoise"]: 0.5, comps["steps"]: 0})
    frames = list(fn(values))
    last = dict(zip(dep["outputs"], frames[-1], strict=True))
    out = {name: last[ui[name]._id] for name in ("compare_error", "compare_grid", "compare_info", "compare_pick")}
    assert out["compare_error"] == "", out
    assert out["compare_grid"].size == (2 * 128, out["compare_grid"].height)
    assert "Seed: 77" in out["compare_info"] and "Sampler: DPM++ 2M" in out["compare_info"]
    assert out["compare_pick"]["choices"] in (["1: alpha 0.25", "2: alpha 0.75"],
                                              [("1: alpha 0.25",) * 2, ("2: alpha 0.75",) * 2])
    (grid,) = grids.iterdir()
    with Image.open(grid) as im:
        assert "a red barn" in im.info["parameters"]
    load_fn, load_dep = _fn_for(ui.blocks, ui["compare_load"])
    shown = dict(zip(load_dep["outputs"], list(load_fn("2: alpha 0.75"))[-1], strict=True))
    assert "alpha 0.75" in shown[ui["unsaved_status"]._id]
    save_fn, _save_dep = _fn_for(ui.blocks, ui["compare_save"])
    list(save_fn("1: alpha 0.25", "tab_pick", False))
    assert _is_direct(tmp_path / "tab_pick.safetensors", 0.25)
    bad = dict(zip(dep["outputs"], list(fn({**values, ui["compare_values"]: "0.2, nope"}))[-1], strict=True))
    assert "is not a number" in bad[ui["compare_error"]._id]


def test_standalone_app_has_no_generator_and_offers_the_sweep(tmp_path):
    from lib_rebasin.ui.service import MergeService
    from lib_rebasin.ui.standalone import StandaloneHost

    service = MergeService(StandaloneHost(tmp_path))
    with pytest.raises(RebasinError, match="sweep"):
        submit_compare(service, _body())
    from lib_rebasin.ui.tab import build_tab

    ui = build_tab(StandaloneHost(tmp_path), service)
    assert "has none" in ui["compare_help"].value and ui["compare_sweep"].visible and not ui["compare_run"].visible


def test_api_compare_job_grid_and_candidate_routes(webui, tmp_path):
    from api_client import webui_api

    _grids_dir(tmp_path, webui)
    _load_file(webui)
    client = webui_api()
    r = client.post("/rebasin/v1/compare", json=_body(values=[0.3, "oops"]))
    assert r.status_code == 422 and r.json()["field"] == "values"
    r = client.post("/rebasin/v1/compare", json={**_body(values=[0.3, 0.6]), "generation": None})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    j = client.finished(job_id)
    assert j["status"] == "done" and j["kind"] == "compare", j
    assert [c["value"] for c in j["candidates"]] == ["alpha 0.3", "alpha 0.6"]
    assert all("Model: alpha + beta" in c["infotext"] for c in j["candidates"])
    r = client.get(f"/rebasin/v1/jobs/{job_id}/grid")
    assert r.status_code == 200 and r.content[:8] == b"\x89PNG\r\n\x1a\n"
    r = client.post("/rebasin/v1/compare/save", json={"job_id": job_id, "index": 5})
    assert r.status_code == 422 and r.json()["field"] == "index"
    r = client.post("/rebasin/v1/compare/save", json={"job_id": job_id, "index": 0, "output_name": "api_pick"})
    assert r.status_code == 202, r.text
    save_id = r.json()["job_id"]
    assert webui.SERVICE.jobs[save_id].wait(120)
    assert (tmp_path / "api_pick.safetensors").is_file()
    r = client.post("/rebasin/v1/compare/load", json={"index": 1})
    assert r.status_code == 202 and r.json()["kind"] == "load"
    assert webui.SERVICE.jobs[r.json()["job_id"]].wait(120)
    assert client.get("/rebasin/v1/loaded").json()["unsaved"]["label"] == "alpha + beta, re-basin, alpha 0.6, unsaved"
