"""SDXL block weights in the tab and over HTTP: model A's architecture picks the slider set (26 for SD 1.x, 20 for
SDXL), a preset fills in its SDXL reading, a count of the other architecture is one line, and a merge from the tab
or the API records the 20 values (runs under gradio 3.41 and 4.40: tests/ui_envs.sh)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lib_rebasin.io.checkpoint import open_checkpoint
from lib_rebasin.merge.block_presets import PRESETS
from lib_rebasin.merge.block_weights import SD1, SDXL
from lib_rebasin.ui import blocks_ui as bui

pytestmark = pytest.mark.ui

N = bui.SLIDER_COUNT
XL = slice(26, N)  # SDXL's sliders among every slider (SD 1.x's first)
GRAD_V_XL = SDXL.preset_values("GRAD_V")


def test_handlers_follow_the_architecture() -> None:
    out = bui.on_preset("GRAD_V", "", "SDXL")
    assert out[0] == bui.values_text(GRAD_V_XL) and out[1:27] == (None,) * 26 and out[XL.start + 1:N + 1] == GRAD_V_XL
    assert out[N + 1].count("<circle") == 19 and ">OUT08<" in out[N + 1] and out[N + 2] is True
    assert GRAD_V_XL[:10] == PRESETS["GRAD_V"][:10] and GRAD_V_XL[10:] == PRESETS["GRAD_V"][13:23]
    # the preset's name typed in the text is read for SDXL too; its 20 values name it back
    typed = bui.on_text("GRAD_V", 0.5, "SDXL")
    assert typed[XL] == GRAD_V_XL and typed[N + 1] == "GRAD_V"
    assert bui.on_sliders(*GRAD_V_XL)[2] == "GRAD_V" and bui.read_blocks(True, bui.values_text(GRAD_V_XL)) == "GRAD_V"
    # the other architecture's count: one line, the sliders kept
    wrong = bui.on_text(",".join(["0.5"] * 26), 0.5, "SDXL")
    assert wrong[:N] == (None,) * N and wrong[N + 1] is None
    assert ("Model A is SDXL: its block weights are 20 values (BASE,IN00..IN08,M00,OUT00..OUT08); got 26."
            in wrong[N])
    wrong = bui.on_text(",".join(["0.5"] * 20), 0.5, "SD 1.x")
    assert "Model A is SD 1.x: its block weights are 26 values (BASE,IN00..IN11,M00,OUT00..OUT11); got 20." in wrong[N]


def test_switching_architecture_switches_the_controls() -> None:
    assert bui.on_architecture("SDXL", "SDXL", "GRAD_V", 0.5) is None
    assert bui.on_architecture(None, "SDXL", "", 0) is None
    arch, note, label, text, sd1_shown, xl_shown, *rest = bui.on_architecture("SDXL", "SD 1.x", "GRAD_V", 0.5)
    assert arch == "SDXL" and "**SDXL**" in note and label.startswith("20 values for SDXL: BASE,IN00..IN08")
    assert (sd1_shown, xl_shown) == (False, True) and text == bui.values_text(GRAD_V_XL)
    assert tuple(rest[XL]) == GRAD_V_XL and rest[-1] == "GRAD_V"
    # custom values have no meaning in the other convention: they start again from alpha
    *_, text, sd1_shown, xl_shown, _rest = bui.on_architecture("SD 1.x", "SDXL", "custom", 0.3)[:7]
    assert text == ",".join(["0.3"] * 26) and (sd1_shown, xl_shown) == (True, False)
    assert [r[0] for r in bui.SLIDER_ROWS["SDXL"]] == ["IN", "MID / BASE", "OUT"]
    assert sum(len(ids) for _, ids in bui.SLIDER_ROWS["SDXL"]) == 20
    assert sum(len(ids) for _, ids in bui.SLIDER_ROWS["SD 1.x"]) == 26


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model_cache import SDXL_SMALL, cached_checkpoint, cached_sdxl_checkpoint, cached_without_parts

    d = tmp_path_factory.mktemp("xl_ckpts")
    full = tmp_path_factory.mktemp("xl_with_vae")
    # The SDXL pair without its VAE (block weights weigh the UNet; the merges take the UNet and the text encoders):
    # each merge writes three quarters of the bytes. Read-only hard links into the model cache.
    for seed, name in ((1, "xl_one"), (2, "xl_two")):
        cached_without_parts(d / f"{name}.safetensors",
                             cached_sdxl_checkpoint(full / f"{name}.safetensors", SDXL_SMALL, seed=seed, base_seed=0))
    cached_checkpoint(d / "sd_one.safetensors", "tiny", seed=1, base_seed=1)
    return d


def _listener(blocks, component, name: str):
    """The function named `name` among `component`'s listeners (model A has several)."""
    for i, dep in enumerate(blocks.get_config_file()["dependencies"]):
        targets = [t[0] if isinstance(t, (list, tuple)) else t for t in dep.get("targets", [])]
        if component._id in targets and blocks.fns[i].fn.__name__ == name:
            return blocks.fns[i].fn
    raise AssertionError(f"no {name} listener on {component}")


def _recipe(path: Path) -> dict:
    with open_checkpoint(path) as ck:
        return json.loads(ck.metadata["lib_rebasin"])["recipe"]


def test_tab_shows_sdxl_sliders_for_an_sdxl_model_a_and_merges(folder: Path) -> None:
    pytest.importorskip("gradio")
    from lib_rebasin.ui.service import MergeService
    from lib_rebasin.ui.standalone import StandaloneHost
    from lib_rebasin.ui.tab import build_tab

    host = StandaloneHost(folder, devices=["cpu"])
    ui = build_tab(host, MergeService(host))
    ids = {c.get("props", {}).get("elem_id") for c in ui.blocks.get_config_file()["components"]}
    assert {"rebasin_block_IN11", "rebasin_block_OUT11", "rebasin_block_xl_BASE", "rebasin_block_xl_IN08",
            "rebasin_block_xl_M00", "rebasin_block_xl_OUT08", "rebasin_blocks_sd1", "rebasin_blocks_xl"} <= ids
    assert "rebasin_block_xl_IN09" not in ids and len(ui["block_sliders_xl"]) == 20
    switch = _listener(ui.blocks, ui["model_a"], "model_a_changed")
    out = switch("xl_one.safetensors", "SD 1.x", "custom", 0.5)
    assert out[0]["value"] == "SDXL" and out[3]["visible"] is False and out[4]["visible"] is True
    assert out[2]["value"] == ",".join(["0.5"] * 20) and out[2]["label"].startswith("20 values for SDXL")
    back = switch("sd_one.safetensors", "SDXL", "GRAD_V", 0.5)
    assert back[0]["value"] == "SD 1.x" and back[2]["value"] == bui.values_text(PRESETS["GRAD_V"])
    assert all(u.get("value", None) is None for u in switch("xl_two.safetensors", "SDXL", "custom", 0.5)[:3])
    assert switch("no_such.safetensors", "SDXL", "custom", 0.5)[0].get("value") is None  # unknown: kept
    # the preset dropdown on SDXL fills SDXL's sliders; the merge records the preset and its 20 values
    filled = _listener(ui.blocks, ui["blocks_preset"], "preset_changed")("GRAD_V", "", "SDXL")
    text = filled[0]["value"]
    assert text == bui.values_text(GRAD_V_XL) and [f.get("value") for f in filled[XL.start + 1:N + 1]] == list(
        GRAD_V_XL)
    run = _listener(ui.blocks, ui["merge"], "run_merge")
    merge = {"model_a": "xl_one.safetensors", "model_b": "xl_two.safetensors", "method": "Weighted sum",
             "device": "cpu", "precision": "fp16", "parts": ["UNet", "Text encoder"], "blocks_on": True}
    last = list(run(ui.values(task_id="task(x1)", **merge, output_name="xl_gradv", blocks_text=text)))[-1]
    assert last[0] == "" and "rebasin-done" in last[1] and ">OUT08<" in last[1], last[:3]
    recipe = _recipe(folder / "xl_gradv.safetensors")
    assert recipe["blocks"] == list(GRAD_V_XL) and recipe["blocks_preset"] == "GRAD_V"
    assert recipe["block_mapping"] == "sdxl-mbw-1" and recipe["blocks_preset_mapping"] == "sdxl-presets-1"
    # 26 values on an SDXL pair: refused in one line before anything runs
    frames = list(run(ui.values(task_id="task(x2)", **merge, output_name="xl_bad", blocks_text="0.5," * 25 + "0.5")))
    assert len(frames) == 1 and "Block weights for SDXL need 20 values (BASE,IN00..IN08,M00,OUT00..OUT08); got 26." \
        in frames[0][0] and not (folder / "xl_bad.safetensors").exists()
    (folder / "xl_gradv.safetensors").unlink()


def test_http_api_takes_twenty_values_and_presets_for_sdxl(folder: Path) -> None:
    pytest.importorskip("gradio")
    from api_client import finished, post, standalone_api

    pair = {"model_a": "xl_one.safetensors", "model_b": "xl_two.safetensors", "method": "weighted_sum",
            "precision": "fp16", "parts": ["unet", "te"]}
    values = [round(0.05 * i, 2) for i in range(20)]
    with standalone_api(folder) as api:
        code, body = post(f"{api}/merge", {**pair, "blocks": [0.5] * 26, "output_name": "api_bad"})
        assert code == 422 and body["field"] == "blocks" and "need 20 values" in body["detail"], body
        code, body = post(f"{api}/merge", {"model_a": "sd_one.safetensors", "model_b": "xl_two.safetensors",
                                           "parts": ["unet", "te"], "blocks": values})
        assert code == 400 and body["detail"] == ("Model A is SD 1.x but model B is SDXL; models of different "
                                                  "architectures cannot be merged."), body
        code, body = post(f"{api}/merge", {**pair, "blocks": values, "output_name": "api_values"})
        assert code == 202, body
        job = finished(api, body["job_id"])
        assert job["status"] == "done" and job["request"]["blocks"] == values, job
        assert _recipe(Path(job["output"]))["blocks"] == values
        code, body = post(f"{api}/merge", {**pair, "blocks": "OUT12", "output_name": "api_preset"})
        assert code == 202, body
        job = finished(api, body["job_id"])
        assert job["status"] == "done" and job["request"]["blocks"] == list(SDXL.preset_values("OUT12")), job
        recipe = _recipe(Path(job["output"]))
        assert recipe["blocks_preset"] == "OUT12" and recipe["blocks_preset_mapping"] == "sdxl-presets-1"
        assert recipe["blocks"] == [PRESETS["OUT12"][SD1.index[b]] for b in SDXL.ids]
        assert not (folder / "api_bad.safetensors").exists()


def test_hires_presets_scale_by_model_a_architecture(folder: Path) -> None:
    """SDXL's first pass is already about 1024 px: the presets upscale it x1.5 (SD 1.x: x2), with the same denoise."""
    gr = pytest.importorskip("gradio")
    from lib_rebasin.ui.host import HIRES_PRESETS, hires_values
    from lib_rebasin.ui.service import MergeService
    from lib_rebasin.ui.standalone import StandaloneHost
    from lib_rebasin.ui.tab import build_tab

    assert [hires_values(p, ["Lanczos"], None, None, "SDXL")["scale"] for p in HIRES_PRESETS] == [1.5] * 3
    assert [hires_values(p, ["Lanczos"], None, None, "SD 1.x")["scale"] for p in HIRES_PRESETS] == [2.0] * 3
    with gr.Blocks():
        targets = {"enable": gr.Checkbox(False), "denoise": gr.Slider(0, 1, value=0.7),
                   "scale": gr.Slider(1, 4, value=2.0), "upscaler": gr.Dropdown(choices=["Latent", "Lanczos"]),
                   "steps": gr.Slider(0, 150, value=0)}

    class WithTxt2img(StandaloneHost):
        def hires_targets(self) -> dict:
            return targets

    host = WithTxt2img(folder, devices=["cpu"])
    ui = build_tab(host, MergeService(host))
    apply = _listener(ui.blocks, ui["preset_balanced"], "apply")
    *updates, note = apply("Latent", "SDXL")
    assert [u.get("value") for u in updates] == [True, 0.55, 1.5, "Lanczos", 0]
    assert "upscale x1.5 (model A is SDXL)" in note
    *updates, note = apply("Latent", "SD 1.x")
    assert updates[2]["value"] == 2.0 and "upscale x2," in note
