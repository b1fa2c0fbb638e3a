"""Block weights and method parameters in the tab and over HTTP (runs under gradio 3.41 and 4.40: tests/ui_envs.sh)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gradio_events import fn_for

from lib_rebasin.io.checkpoint import open_checkpoint
from lib_rebasin.merge.block_presets import PRESETS
from lib_rebasin.ui import blocks_ui as bui

pytestmark = pytest.mark.ui


def test_block_handlers_and_curve() -> None:
    n = bui.SLIDER_COUNT  # both sets: SD 1.x's 26 sliders, then SDXL's 20
    out = bui.on_preset("GRAD_V", "")
    assert out[0].startswith("0,1,0.9166666667,") and tuple(out[1:27]) == PRESETS["GRAD_V"] and out[n + 2] is True
    assert out[27:n + 1] == (None,) * 20  # SDXL's sliders are left as they are
    assert "<svg" in out[n + 1] and "GRAD_V" in out[n + 1] and out[n + 1].count("<circle") == 25
    sliders = bui.on_text("0.5," * 24 + "0.5", 0.2)  # 25 values: BASE = alpha
    assert sliders[0] == 0.2 and sliders[1:26] == (0.5,) * 25 and sliders[n + 1] == "custom"
    bad = bui.on_text("1,2", 0.5)
    assert bad[:n] == (None,) * n and "need 26 values" in bad[n] and "rebasin-error" in bad[n]
    text, plot, name = bui.on_sliders(*PRESETS["OUT12"])
    assert name == "OUT12" and text == ",".join(["0"] * 14 + ["1"] * 12)
    from lib_rebasin.methods import ALL_PARAMS
    from lib_rebasin.ui.tab.controls import param_visibility

    vis = param_visibility("ties")  # each method parameter (ALL_PARAMS order), then seed, then align
    assert [v["visible"] for v in vis] == [n in ("ties_density", "ties_scale") for n in ALL_PARAMS] + [False, True]
    assert [v["visible"] for v in param_visibility("rebasin")] == [False] * (len(ALL_PARAMS) + 2)


def test_recipe_builder_keeps_block_weights_and_params(tmp_path) -> None:
    from model_cache import cached_checkpoint

    from lib_rebasin.recipe.parse import parse_recipe
    from lib_rebasin.ui import recipe_builder as rb
    from lib_rebasin.ui.standalone import StandaloneHost

    for i, name in enumerate(("one", "two", "base"), 1):
        cached_checkpoint(tmp_path / f"{name}.safetensors", "tiny", seed=i, base_seed=1)
    host = StandaloneHost(tmp_path, devices=["cpu"])
    e = host.list_checkpoints()
    text = rb.add_step("", rb.StepForm("ties", "one.safetensors", "two.safetensors", "base.safetensors", alpha=0.5,
                                       parts=("unet",)), e, host.output_dir())
    assert "ties_density = 0.2" in text  # the canonical text lists the method's parameters
    text = text.replace("ties_density = 0.2", 'ties_density = 0.4\nblocks = "GRAD_A"')
    text = rb.apply_text(text)
    # editing the step in the form (alpha only) keeps what the form has no field for
    text = rb.update_step(text, 0, rb.StepForm("ties", "one.safetensors", "two.safetensors", "base.safetensors",
                                               alpha=0.7, parts=("unet",)), e, host.output_dir())
    o = parse_recipe(text).steps[0].options
    assert o.alpha == 0.7 and o.blocks == PRESETS["GRAD_A"] and o.blocks_preset == "GRAD_A" and o.ties_density == 0.4
    # a new step gets the recipe's default block weights
    text = text.replace('[recipe]', '[recipe]\nblocks = "OUT07"')
    text = rb.add_step(rb.apply_text(text), rb.StepForm("weighted_sum", "[step] step1", "two.safetensors", alpha=0.5,
                                                        parts=("unet",)), e, host.output_dir())
    assert parse_recipe(text).steps[1].options.blocks == PRESETS["OUT07"]


_fn_for = fn_for


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from model_cache import cached_checkpoint, cached_without_parts, place

    d = tmp_path_factory.mktemp("ckpts")
    full = tmp_path_factory.mktemp("with_vae")
    # A and B without their VAE where a merge takes the UNet and the text encoder (or less): each output is half
    # the bytes. The tests that bake a VAE in merge them with theirs (one_vae, two_vae); the base keeps its VAE, the
    # donor.
    for seed, name in ((1, "one"), (2, "two")):
        place(cached_checkpoint(full / f"{name}.safetensors", "tiny", seed=seed, base_seed=1),
              d / f"{name}_vae.safetensors")
        cached_without_parts(d / f"{name}.safetensors", full / f"{name}.safetensors")
    cached_checkpoint(d / "base.safetensors", "tiny", seed=0, base_seed=1, delta=0.0)
    return d


def _meta(path: Path) -> dict:
    with open_checkpoint(path) as ck:
        return dict(ck.metadata)


def test_tab_merges_with_a_preset_and_method_params(folder):
    pytest.importorskip("gradio")
    from lib_rebasin.ui.service import MergeService
    from lib_rebasin.ui.standalone import StandaloneHost
    from lib_rebasin.ui.tab import build_tab

    host = StandaloneHost(folder, devices=["cpu"])
    ui = build_tab(host, MergeService(host))
    config = ui.blocks.get_config_file()
    ids = {c.get("props", {}).get("elem_id") for c in config["components"]}
    assert {"rebasin_blocks_preset", "rebasin_blocks_text", "rebasin_blocks_plot", "rebasin_block_BASE",
            "rebasin_block_IN00", "rebasin_block_M00", "rebasin_block_OUT11", "rebasin_param_ties_density",
            "rebasin_param_dare_p", "rebasin_align"} <= ids
    # choosing a method shows its parameters only
    shown = _fn_for(ui.blocks, ui["method"], "change")("TIES")
    assert shown[0]["visible"] is True and shown[3]["visible"] is True and shown[5]["visible"] is False
    # choosing a preset fills the text, the 26 sliders and the plot, and turns block weights on
    filled = _fn_for(ui.blocks, ui["blocks_preset"], "change")("WRAP08", "", "SD 1.x")
    assert filled[0]["value"].startswith("0,1,1,1,1,0") and filled[2]["value"] == 1 and filled[6]["value"] == 0
    assert "<svg" in filled[-2]["value"] and filled[-1]["value"] is True
    # the output field suggests a name from models, method and preset
    suggest = _fn_for(ui.blocks, ui["model_a"], "change")
    assert "one_two_ties_0.50_WRAP08" in suggest(ui.values(model_a="one.safetensors", model_b="two.safetensors",
                                                           method="TIES", alpha=0.5, blocks_on=True,
                                                           blocks_preset="WRAP08"))["placeholder"]
    run = _fn_for(ui.blocks, ui["merge"])
    frames = list(run(ui.values(task_id="task(b1)", model_a="one.safetensors", model_b="two.safetensors",
                                model_c="base.safetensors", method="TIES", alpha=0.5, iterations=1,
                                parts=["UNet", "Text encoder"], device="cpu", precision="fp16",
                                output_name="", overwrite=False, tolerance=1.0, blocks_on=True, blocks_text="WRAP08",
                                param_ties_density=0.5, param_ties_scale=0.8, param_dare_p=0.9, param_seed=0,
                                align=False)))
    last = frames[-1]
    assert last[0] == "" and "rebasin-done" in last[1] and "<svg" in last[1] and "WRAP08" in last[1], last[:3]
    assert "Block weights" in last[2]
    out = Path(last[3])
    assert out.name == "one_two_ties_0.50_WRAP08.safetensors"
    recipe = json.loads(_meta(out)["lib_rebasin"])["recipe"]
    assert recipe["blocks"] == list(PRESETS["WRAP08"]) and recipe["blocks_preset"] == "WRAP08"
    assert recipe["ties_density"] == 0.5 and recipe["ties_scale"] == 0.8
    # a bad block string is refused before anything runs, in one line
    frames = list(run(ui.values(task_id="task(b2)", model_a="one.safetensors", model_b="two.safetensors",
                                model_c=None, method="Weighted sum", parts=["UNet"], device="cpu", precision="fp16",
                                output_name="bad_blocks", blocks_on=True, blocks_text="1,2,3")))
    assert len(frames) == 1 and "Block weights need 26 values" in frames[0][0]
    assert not (folder / "bad_blocks.safetensors").exists()


def test_tab_records_the_preset_chosen_in_the_dropdown(folder):
    """Choosing a preset fills in its 26 values; the merge records the preset's name (as the CLI and the API do),
    and the result card and the curve name it."""
    pytest.importorskip("gradio")
    from lib_rebasin.ui.service import MergeService
    from lib_rebasin.ui.standalone import StandaloneHost
    from lib_rebasin.ui.tab import build_tab

    host = StandaloneHost(folder, devices=["cpu"])
    ui = build_tab(host, MergeService(host))
    text = _fn_for(ui.blocks, ui["blocks_preset"], "change")("GRAD_V", "", "SD 1.x")[0]["value"]
    assert text[0].isdigit()  # the values, not the name, are what the merge button reads
    run = _fn_for(ui.blocks, ui["merge"])
    frames = list(run(ui.values(task_id="task(p1)", model_a="one.safetensors", model_b="two.safetensors",
                                method="Weighted sum", parts=["Text encoder"], device="cpu", precision="fp16",
                                output_name="preset_named", blocks_on=True, blocks_text=text)))
    last = frames[-1]
    assert last[0] == "" and "rebasin-done" in last[1], last[:3]
    recipe = json.loads(_meta(folder / "preset_named.safetensors")["lib_rebasin"])["recipe"]
    assert recipe["blocks"] == list(PRESETS["GRAD_V"]) and recipe["blocks_preset"] == "GRAD_V"
    assert "GRAD\\_V = " in last[2] and "GRAD_V" in last[1]  # the card (Markdown-escaped) and the curve's title
    # values edited away from the preset: recorded as custom values, no name
    edited = "0.3," + text.split(",", 1)[1]
    assert bui.read_blocks(True, edited) == edited and bui.read_blocks(False, text) == ""
    (folder / "preset_named.safetensors").unlink()


def test_http_api_takes_blocks_and_method_params(folder):
    pytest.importorskip("gradio")
    from api_client import finished, post, standalone_api

    with standalone_api(folder) as api:
        code, body = post(f"{api}/merge", {"model_a": "one.safetensors", "model_b": "two.safetensors",
                                           "blocks": "NOPE"})
        assert code == 422 and body["field"] == "blocks" and "Unknown block-weight preset 'NOPE'" in body["detail"]
        code, body = post(f"{api}/merge", {"model_a": "one.safetensors", "model_b": "two.safetensors",
                                           "model_c": "base.safetensors", "method": "dare", "dare_p": 1.5})
        assert code == 422 and body["field"] == "dare_p" and "dare_p must be in" in body["detail"]
        code, body = post(f"{api}/merge", {"model_a": "one.safetensors", "model_b": "two.safetensors",
                                           "model_c": "base.safetensors", "method": "dare", "dare_p": 0.5,
                                           "seed": 4, "blocks": [0.5] * 25, "alpha": 0.25, "parts": ["unet", "te"],
                                           "output_name": "via_api_dare"})
        assert code == 202, body
        job = finished(api, body["job_id"])
        assert job["status"] == "done", job
        assert job["request"]["blocks"] == [0.25] + [0.5] * 25 and job["request"]["dare_p"] == 0.5
        meta = _meta(Path(job["output"]))
        webui = json.loads(meta["sd_merge_recipe"])
        assert webui["blocks"] == [0.25] + [0.5] * 25 and webui["base_alpha"] == 0.25 and webui["seed"] == 4


def _donor_vae(folder):
    """base.safetensors' VAE saved as a standalone VAE file in the folder's VAE/ (the host's VAE list)."""
    from model_cache import cached_state_dict

    with open_checkpoint(folder / "base.safetensors") as ck:
        donor = {k[len("first_stage_model."):]: ck.get(k).clone() for k in ck.keys()
                 if k.startswith("first_stage_model.")}
    (folder / "VAE").mkdir(exist_ok=True)
    cached_state_dict(folder / "VAE" / "donor.safetensors", donor)  # replaces an earlier test's link
    return donor


def test_tab_bakes_a_vae_from_the_vae_folder(folder):
    pytest.importorskip("gradio")
    import torch

    from lib_rebasin.ui.service import MergeService
    from lib_rebasin.ui.standalone import StandaloneHost
    from lib_rebasin.ui.tab import build_tab

    donor = _donor_vae(folder)
    host = StandaloneHost(folder, devices=["cpu"])
    assert [e.title for e in host.list_vaes()] == ["donor.safetensors"]
    ui = build_tab(host, MergeService(host))
    assert "donor.safetensors" in ui["bake_vae"].choices or ("donor.safetensors", "donor.safetensors") in \
        ui["bake_vae"].choices
    run = _fn_for(ui.blocks, ui["merge"])
    # fp16, the models' own precision: the baked VAE holds the donor's very bits
    merge = dict(model_a="one_vae.safetensors", model_b="two_vae.safetensors", method="Weighted sum", device="cpu",
                 precision="fp16", blocks_on=False)
    frames = list(run(ui.values(task_id="task(v1)", **merge, parts=["UNet", "Text encoder", "VAE"],
                                output_name="baked", bake_vae="donor.safetensors")))
    last = frames[-1]
    assert "rebasin-done" in last[1] and "VAE baked in from donor.safetensors" in last[2], last[:3]
    with open_checkpoint(folder / "baked.safetensors") as ck:
        assert all(torch.equal(ck.get("first_stage_model." + k), v) for k, v in donor.items())
        assert json.loads(ck.metadata["sd_merge_recipe"])["bake_in_vae"] == "donor.safetensors"
    # a file that is no VAE is refused before anything runs
    frames = list(run(ui.values(task_id="task(v2)", **merge, parts=["UNet"],
                                output_name="baked2", bake_vae="nowhere.safetensors")))
    assert len(frames) == 1 and "neither in the VAE list nor a checkpoint" in frames[0][0]


def test_recipe_section_bakes_a_vae_picked_from_the_vae_list(folder):
    pytest.importorskip("gradio")
    import torch

    from lib_rebasin.recipe.parse import parse_recipe
    from lib_rebasin.ui.service import MergeService
    from lib_rebasin.ui.standalone import StandaloneHost
    from lib_rebasin.ui.tab import build_tab

    donor = _donor_vae(folder)
    host = StandaloneHost(folder, devices=["cpu"])
    ui = build_tab(host, MergeService(host))
    choices = [ch[0] if isinstance(ch, (tuple, list)) else ch for ch in ui["recipe_bake_vae"].choices]
    assert choices[:2] == ["None", "donor.safetensors"]
    # the VAE folder's files are VAEs, not checkpoints (the standalone app keeps them in <models-dir>/VAE)
    titles = [e.title for e in host.list_checkpoints()]
    assert "one.safetensors" in titles and not [t for t in titles if "donor" in t]
    add = _fn_for(ui.blocks, ui["recipe_add"])
    bake = _fn_for(ui.blocks, ui["recipe_bake_vae"], "change")
    # picked before any step: kept through adding the step
    text, overview, err = bake("", "donor.safetensors")
    assert err == "" and parse_recipe(text + '[[step]]\na = "donor"\nb = "donor"\n').bake_vae == "donor"
    out = add(ui.values(recipe_text=text, recipe_name="vae chain", recipe_precision="fp16", recipe_device="cpu",
                        recipe_seed=0, recipe_step=None, recipe_a="one_vae.safetensors",
                        recipe_b="two_vae.safetensors", recipe_c=None, recipe_alpha=0.5, recipe_iterations=1,
                        recipe_parts=["UNet", "Text encoder", "VAE"], recipe_step_name=""))
    text = out[0]
    assert out[2] == "" and parse_recipe(text).bake_vae == "donor" and "baked in" in out[1]
    run = _fn_for(ui.blocks, ui["recipe_run"])
    frames = list(run(ui.values(task_id="task(rv)", recipe_text=text, recipe_name="vae chain",
                                recipe_precision="fp16", recipe_device="cpu", recipe_seed=0, recipe_output_name="",
                                recipe_overwrite=False)))
    assert "rebasin-done" in frames[-1][1], frames[-1][:3]
    with open_checkpoint(folder / "vae_chain.safetensors") as ck:
        assert all(torch.equal(ck.get("first_stage_model." + k), v) for k, v in donor.items())
    # "None" un-bakes it and drops the VAE's model entry
    text2, _, err = bake(text, "None")
    assert err == "" and parse_recipe(text2).bake_vae is None and "donor.safetensors" not in text2
    # a name that is neither a VAE nor a checkpoint: one line, text unchanged
    _, _, err = bake(text, "nowhere.safetensors")
    assert "neither in the VAE list nor a checkpoint" in err
    (folder / "vae_chain.safetensors").unlink()


def test_tab_merges_with_activation_matching(folder):
    pytest.importorskip("gradio")
    from lib_rebasin.ui.service import MergeService
    from lib_rebasin.ui.standalone import StandaloneHost
    from lib_rebasin.ui.tab import build_tab

    ui = build_tab(StandaloneHost(folder, devices=["cpu"]), MergeService(StandaloneHost(folder, devices=["cpu"])))
    ids = {c.get("props", {}).get("elem_id") for c in ui.blocks.get_config_file()["components"]}
    assert {"rebasin_matching", "rebasin_activation_samples"} <= ids
    run = _fn_for(ui.blocks, ui["merge"])
    merge = dict(model_a="one.safetensors", model_b="two.safetensors", parts=["Text encoder"], device="cpu",
                 precision="fp16", tolerance=1.0, blocks_on=False, align=False, bake_vae="None",
                 matching="activations", activation_samples=2)
    frames = list(run(ui.values(task_id="task(m1)", **merge, method="rebasin", output_name="by_activations",
                                param_seed=3)))
    last = frames[-1]
    assert "rebasin-done" in last[1] and "Activation matching: " in last[2], last[:3]
    recipe = json.loads(_meta(folder / "by_activations.safetensors")["lib_rebasin"])["recipe"]
    assert (recipe["matching"], recipe["activation_samples"], recipe["seed"]) == ("activations", 2, 3)
    # activation matching chooses how re-basin aligns: hidden for a method that does not align, and the value it
    # kept from before is not used (the merge is not refused for a control the user cannot see)
    frames = list(run(ui.values(task_id="task(m2)", **merge, method="Weighted sum", output_name="hidden_matching",
                                param_seed=0)))
    assert frames[-1][0] == "" and "rebasin-done" in frames[-1][1], frames[-1][:3]
    recipe = json.loads(_meta(folder / "hidden_matching.safetensors")["lib_rebasin"])["recipe"]
    assert recipe.get("matching", "weights") == "weights"
    (folder / "hidden_matching.safetensors").unlink()


def test_tab_merges_with_repair(folder):
    pytest.importorskip("gradio")
    from lib_rebasin.ui.service import MergeService
    from lib_rebasin.ui.standalone import StandaloneHost
    from lib_rebasin.ui.tab import build_tab

    ui = build_tab(StandaloneHost(folder, devices=["cpu"]), MergeService(StandaloneHost(folder, devices=["cpu"])))
    components = ui.blocks.get_config_file()["components"]
    box = next(c for c in components if c.get("props", {}).get("elem_id") == "rebasin_repair")
    assert box["props"]["label"].startswith("REPAIR: restore the parents' activation statistics after blending")
    run = _fn_for(ui.blocks, ui["merge"])
    merge = dict(model_a="one.safetensors", model_b="two.safetensors", method="Weighted sum", device="cpu",
                 precision="fp16", blocks_on=False, matching="weights", activation_samples=1, repair=True)
    frames = list(run(ui.values(task_id="task(r1)", **merge, parts=["UNet"], output_name="repaired",
                                param_seed=3)))
    assert "rebasin-done" in frames[-1][1], frames[-1][:3]
    recipe = json.loads(_meta(folder / "repaired.safetensors")["lib_rebasin"])["recipe"]
    assert (recipe["repair"], recipe["activation_samples"], recipe["seed"]) == (True, 1, 3)
    # REPAIR without the UNet: refused before anything runs, no file
    frames = list(run(ui.values(task_id="task(r2)", **merge, parts=["Text encoder"], output_name="refused")))
    assert len(frames) == 1 and "parts must include unet" in frames[0][0], frames[0][0]
    assert not (folder / "refused.safetensors").exists()


def test_matching_and_repair_show_only_where_they_apply(folder):
    """REPAIR shows for the methods the core repairs (options.REPAIRABLE), the matching radio where the merge aligns
    (re-basin, or another method with align), the prompts where either uses them; a checked REPAIR hidden by a
    method change is not sent (no refusal after pressing Merge for a control the user cannot see)."""
    pytest.importorskip("gradio")
    from lib_rebasin.methods import METHODS
    from lib_rebasin.options import REPAIRABLE, MergeOptions
    from lib_rebasin.ui.service import MergeService
    from lib_rebasin.ui.standalone import StandaloneHost
    from lib_rebasin.ui.tab import build_tab

    host = StandaloneHost(folder, devices=["cpu"])
    ui = build_tab(host, MergeService(host))
    props = {c["props"].get("elem_id"): c["props"] for c in ui.blocks.get_config_file()["components"]}
    default = ui["method"].value  # re-basin: aligns and is repairable
    assert props["rebasin_matching"]["visible"] is True and props["rebasin_repair"]["visible"] is True
    assert props["rebasin_activation_samples"]["visible"] is False  # weights matching, no REPAIR: unused
    on = _fn_for(ui.blocks, ui["repair"], "change")
    deps = [d for i, d in enumerate(ui.blocks.get_config_file()["dependencies"]) if ui.blocks.fns[i].fn is on]
    triggers = {t[0] if isinstance(t, (list, tuple)) else t for d in deps for t in d["targets"]}
    assert triggers == {ui[k]._id for k in ("method", "align", "matching", "repair")}
    assert all(d["outputs"] == [ui["matching"]._id, ui["activation_samples"]._id, ui["repair"]._id] for d in deps)
    for key, info in METHODS.items():
        for align in (False, True):
            matching, prompts, repair = on(ui.values(method=info.label, align=align, matching="activations",
                                                     repair=False))
            aligned = MergeOptions(method=key, align=align and key not in ("rebasin", "legacy")).aligned
            assert matching["visible"] is aligned and prompts["visible"] is aligned, (key, align)
            assert repair["visible"] is (key in REPAIRABLE), key
    assert on(ui.values(method=default, align=False, matching="weights", repair=True))[1]["visible"] is True
    assert on(ui.values(method="Add difference", align=False, matching="weights", repair=True))[2]["visible"] is False
    run = _fn_for(ui.blocks, ui["merge"])
    frames = list(run(ui.values(task_id="task(r3)", model_a="one.safetensors", model_b="two.safetensors",
                                model_c="base.safetensors", method="Add difference", parts=["UNet"], device="cpu",
                                precision="fp16", output_name="hidden_repair", blocks_on=False, matching="weights",
                                activation_samples=1, repair=True)))
    assert frames[-1][0] == "" and "rebasin-done" in frames[-1][1], frames[-1][:3]
    assert "repair" not in json.loads(_meta(folder / "hidden_repair.safetensors")["lib_rebasin"])["recipe"]
    (folder / "hidden_repair.safetensors").unlink()


def test_webui_adapter_lists_the_hosts_vaes(folder, tmp_path, monkeypatch):
    pytest.importorskip("gradio")
    """scripts/rebasin_tab.py reads the WebUI's VAE list (modules.sd_vae) through the stand-in host."""
    import importlib.util
    import sys

    root = Path(__file__).resolve().parents[1]
    standin = Path(__file__).resolve().parent / "webui_standin"

    def drop():
        for name in list(sys.modules):
            if name.split(".")[0] in ("modules", "rebasin_webui") or name in ("launch", "rebasin_tab.py"):
                del sys.modules[name]

    drop()
    monkeypatch.syspath_prepend(str(standin))
    try:
        from modules import sd_models, sd_vae

        sd_models.model_path = str(folder)
        sd_vae.vae_path = str(tmp_path / "VAE")
        (tmp_path / "VAE").mkdir()
        (tmp_path / "VAE" / "kl-f8.safetensors").write_bytes(b"x")
        (folder / "near.vae.pt").write_bytes(b"x")
        spec = importlib.util.spec_from_file_location("rebasin_tab.py", root / "scripts" / "rebasin_tab.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        titles = sorted(e.title for e in mod.WebUIHost().list_vaes())
        assert titles == ["kl-f8.safetensors", "near.vae.pt"]
    finally:
        (folder / "near.vae.pt").unlink(missing_ok=True)
        drop()
