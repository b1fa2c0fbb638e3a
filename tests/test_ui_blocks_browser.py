"""SDXL block weights in a real headless Chromium (the standalone app, as tests/test_browser.py): choosing an SDXL
model A shows SDXL's 20 sliders, a preset fills in its SDXL reading, an SD 1.x model A brings the 26 back, a count
of the other architecture is one line under the text, and a merge with a preset on the SDXL pair records it.
Run with: pytest -m browser"""

from __future__ import annotations

import json
import time

import pytest
from browser_app import open_page, pick, requirements, standalone

from lib_rebasin.merge.block_weights import SDXL

pytestmark = [pytest.mark.ui, pytest.mark.browser]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    requirements()
    from model_cache import SDXL_SMALL, cached_checkpoint, cached_sdxl_checkpoint

    models = tmp_path_factory.mktemp("models")
    cached_sdxl_checkpoint(models / "xl_one.safetensors", SDXL_SMALL, seed=1, base_seed=0)  # read-only hard links
    cached_sdxl_checkpoint(models / "xl_two.safetensors", SDXL_SMALL, seed=2, base_seed=0)
    cached_checkpoint(models / "sd_one.safetensors", "tiny", seed=1, base_seed=0)
    with standalone(models, tmp_path_factory.mktemp("server") / "server.log") as url:
        yield url, models


def _shown_sliders(page) -> list[str]:
    return page.evaluate("() => Array.from(document.querySelectorAll('[id^=rebasin_block_]'))"
                         ".filter(e => e.offsetParent !== null).map(e => e.id)")


def _wait_for_sliders(page, count: int) -> list[str]:
    deadline = time.time() + 30
    while len(ids := _shown_sliders(page)) != count and time.time() < deadline:
        page.wait_for_timeout(200)
    return ids


def test_sdxl_model_a_switches_the_block_sliders_and_merges_a_preset(app, tmp_path):
    url, models = app
    with open_page(url, height=1600) as page:
        page.wait_for_selector("#rebasin_merge", state="visible")
        page.locator("#rebasin_blocks").first.locator("button, .label-wrap").first.click()
        assert len(_wait_for_sliders(page, 26)) == 26  # SD 1.x's set until model A says otherwise
        pick(page, "rebasin_model_a", "xl_one.safetensors")
        ids = _wait_for_sliders(page, 20)
        assert sorted(ids) == sorted(f"rebasin_block_xl_{b}" for b in SDXL.ids)
        assert "Model A is SDXL" in page.locator("#rebasin_blocks_note").first.inner_text()
        text = page.locator("#rebasin_blocks_text input, #rebasin_blocks_text textarea").first
        pick(page, "rebasin_blocks_preset", "GRAD_V")
        want = ",".join(f"{v:g}" if v == int(v) else repr(v) for v in SDXL.preset_values("GRAD_V"))
        deadline = time.time() + 30
        while text.input_value() != want and time.time() < deadline:
            page.wait_for_timeout(200)
        assert text.input_value() == want
        assert page.locator("#rebasin_blocks_on input").first.is_checked()
        page.screenshot(path=str(tmp_path / "sdxl_blocks.png"), full_page=True)
        # 26 values typed for an SDXL model A: one line under the text, the sliders kept
        text.fill(",".join(["0.5"] * 26))
        text.press("Enter")
        alert = page.locator("#rebasin_blocks_plot .rebasin-error").first
        alert.wait_for(state="visible")
        assert alert.inner_text().strip() == ("Model A is SDXL: its block weights are 20 values "
                                              "(BASE,IN00..IN08,M00,OUT00..OUT08); got 26.")
        # back to the preset's values, then the SD 1.x model brings the 26 sliders and GRAD_V's 26 values
        pick(page, "rebasin_blocks_preset", "custom")
        pick(page, "rebasin_blocks_preset", "GRAD_V")
        pick(page, "rebasin_model_a", "sd_one.safetensors")
        assert len(_wait_for_sliders(page, 26)) == 26
        deadline = time.time() + 30
        while len(text.input_value().split(",")) != 26 and time.time() < deadline:
            page.wait_for_timeout(200)
        assert text.input_value().startswith("0,1,0.9166666667,")
        # the SDXL pair merged with GRAD_V from the tab
        pick(page, "rebasin_model_a", "xl_one.safetensors")
        assert len(_wait_for_sliders(page, 20)) == 20
        pick(page, "rebasin_model_b", "xl_two.safetensors")
        page.locator("#rebasin_method label", has_text="Weighted sum").first.click()
        name = page.locator("#rebasin_output_name input, #rebasin_output_name textarea").first
        name.fill("browser_xl_gradv")
        name.press("Tab")
        page.locator("#rebasin_merge").first.click()
        page.locator("#rebasin_progress .rebasin-done").first.wait_for(state="visible", timeout=300_000)
        page.screenshot(path=str(tmp_path / "sdxl_merged.png"), full_page=True)
    from lib_rebasin.io.checkpoint import open_checkpoint

    with open_checkpoint(models / "browser_xl_gradv.safetensors") as ck:
        recipe = json.loads(ck.metadata["lib_rebasin"])["recipe"]
    assert recipe["blocks_preset"] == "GRAD_V" and recipe["blocks"] == list(SDXL.preset_values("GRAD_V"))
    assert recipe["blocks_preset_mapping"] == "sdxl-presets-1"
