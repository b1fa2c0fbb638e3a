"""The standalone Re-Basin app driven in a real headless Chromium (Debian's /usr/bin/chromium) via Playwright.

Picks two small synthetic checkpoints, refuses a bad input with its reason, runs a re-basin merge, watches the
progress finish, checks the file and the diagnostics, loads the result, and saves screenshots into the test's
tmp folder (also into $REBASIN_SCREENSHOT_DIR when set, for CI artifacts). The compare section runs against the
WebUI stand-in server (tests/webui_standin/webui.py, with its txt2img tab); the standalone app shows the sweep in
its place. Run with: pytest -m browser
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
from browser_app import ROOT, free_port, open_page, pick, requirements, serve, standalone

pytestmark = [pytest.mark.ui, pytest.mark.browser]


def _two_models(tmp_path_factory, name: str) -> Path:
    """A models folder with two tiny fine-tunes of one base (read-only hard links into the test model cache)."""
    from model_cache import cached_checkpoint

    models = tmp_path_factory.mktemp(name)
    cached_checkpoint(models / "anime_style.safetensors", "tiny", seed=1, base_seed=0)
    cached_checkpoint(models / "photo_style.safetensors", "tiny", seed=2, base_seed=0)
    return models


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    requirements()
    models = _two_models(tmp_path_factory, "models")
    with standalone(models, tmp_path_factory.mktemp("server") / "server.log") as url:
        yield url, models


@pytest.fixture(scope="module")
def webui_app(tmp_path_factory):
    """The WebUI stand-in server (A1111's startup order, a txt2img tab, the extension's tab), two tiny models."""
    requirements()
    models = _two_models(tmp_path_factory, "webui_models")
    data = tmp_path_factory.mktemp("webui_data")
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    with serve([sys.executable, str(ROOT / "tests" / "webui_standin" / "webui.py"), "--models-dir", str(models),
                "--data-dir", str(data), "--port", str(port)], url, data / "server.log", {"OMP_NUM_THREADS": "1"}):
        yield url, models, data


@pytest.fixture()
def page(app):
    with open_page(app[0]) as pg:
        pg.wait_for_selector("#rebasin_merge", state="visible")
        yield pg


@pytest.fixture()
def webui_page(webui_app):
    with open_page(webui_app[0]) as pg:
        pg.click("button:has-text('Re-Basin')")  # the extension's tab, after txt2img
        pg.wait_for_selector("#rebasin_merge", state="visible")
        yield pg


def _shot(page, tmp_path, name):
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    extra = os.environ.get("REBASIN_SCREENSHOT_DIR")
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(extra) / name)
    return path


def _type_name(page, name):
    field = page.locator("#rebasin_output_name input, #rebasin_output_name textarea").first
    field.fill(name)
    field.press("Tab")


def test_bad_input_shows_its_reason(page, app, tmp_path):
    pick(page, "rebasin_model_a", "anime_style.safetensors")
    pick(page, "rebasin_model_b", "anime_style.safetensors")
    _type_name(page, "should_not_exist")
    page.click("#rebasin_merge")
    err = page.locator("#rebasin_error .rebasin-error")
    err.wait_for(state="visible")
    assert "same file" in err.inner_text()
    pick(page, "rebasin_model_b", "photo_style.safetensors")
    _type_name(page, "../escape")
    page.click("#rebasin_merge")
    page.wait_for_function(
        "() => (document.querySelector('#rebasin_error')||{}).innerText?.includes('outside the checkpoint folder')")
    _shot(page, tmp_path, "rebasin_bad_input.png")
    assert not list(app[1].glob("should_not_exist*")) and not list(app[1].parent.glob("escape*"))


def test_rebasin_merge_end_to_end(page, app, tmp_path):
    url, models = app
    pick(page, "rebasin_model_a", "anime_style.safetensors")
    pick(page, "rebasin_model_b", "photo_style.safetensors")
    _type_name(page, "browser_merge")
    page.click("#rebasin_merge")
    # progress shows up while it runs, then finishes
    page.wait_for_selector("#rebasin_progress .rebasin-progress", timeout=60_000)
    page.wait_for_selector("#rebasin_progress .rebasin-done", timeout=600_000)
    status = page.locator("#rebasin_progress .rebasin-status-line").inner_text()
    assert "Done" in status and "browser_merge.safetensors" in status
    out = models / "browser_merge.safetensors"
    assert out.is_file() and out.stat().st_size > 1_000_000
    assert not [p for p in models.iterdir() if p.name.endswith(".tmp")]
    result = page.locator("#rebasin_result").first
    result.wait_for(state="visible")
    text = result.inner_text()
    assert "browser_merge.safetensors" in text and "What the merge did" in text
    assert page.locator("#rebasin_error .rebasin-error").count() == 0
    # the new file is in the dropdowns after a refresh, and can be "loaded"
    page.click("#rebasin_load")
    page.wait_for_function(
        "() => (document.querySelector('#rebasin_load_status')||{}).innerText?.includes('Loaded')")
    page.click("#rebasin_refresh_a")
    page.wait_for_timeout(1000)
    pick(page, "rebasin_model_a", "browser_merge.safetensors")  # the new file is offered after a refresh
    shot = _shot(page, tmp_path, "rebasin_merge_done.png")
    assert shot.stat().st_size > 10_000


def test_recipe_step_buttons_stay_on_one_line(page):
    page.click("#rebasin_recipe")  # open the recipe accordion
    down = page.locator("#rebasin_recipe_down").first
    down.wait_for(state="visible")
    style = page.evaluate("() => getComputedStyle(document.querySelector('#rebasin_recipe_down')).whiteSpace")
    assert style == "nowrap"
    line = page.evaluate("() => parseFloat(getComputedStyle(document.querySelector('#rebasin_recipe_down')).lineHeight)"
                         " || 20")
    box = down.bounding_box()
    up = page.locator("#rebasin_recipe_up").first.bounding_box()
    assert abs(box["height"] - up["height"]) < 1 and box["height"] < 3 * line  # one line, like its neighbour


def test_compare_grid_in_the_webui_then_save_a_candidate(webui_page, webui_app, tmp_path):
    page = webui_page
    _url, models, data = webui_app
    pick(page, "rebasin_model_a", "anime_style.safetensors")
    pick(page, "rebasin_model_b", "photo_style.safetensors")
    page.click("#rebasin_compare")  # open the accordion
    values = page.locator("#rebasin_compare_values input, #rebasin_compare_values textarea").first
    values.wait_for(state="visible")
    assert "txt2img" in page.locator("#rebasin_compare_help").first.inner_text()
    values.fill("0.2, x")
    page.click("#rebasin_compare_run")
    page.wait_for_function(
        "() => (document.querySelector('#rebasin_compare_error')||{}).innerText?.includes('is not a number')")
    values.fill("0.3, 0.7")
    values.press("Tab")
    page.click("#rebasin_compare_run")
    page.wait_for_selector("#rebasin_compare_status .rebasin-done", timeout=600_000)
    status = page.locator("#rebasin_compare_status .rebasin-status-line").first.inner_text()
    assert "a grid of 2 candidates" in status and "seed 42" in status
    page.locator("#rebasin_compare_grid img").first.wait_for(state="visible")
    grids = list((data / "outputs" / "txt2img-grids").glob("*.png"))
    assert len(grids) == 1
    from PIL import Image

    with Image.open(grids[0]) as im:
        assert im.width == 2 * 64 and "a lighthouse" in im.info["parameters"]
    assert "alpha 0.7" in page.locator("#rebasin_compare_info").first.inner_text()
    # nothing of the component's own is drawn over the picture's top band, where the cells' labels are (a real
    # A1111 showed gradio's "Grid" badge over the first cell's label)
    covering = page.evaluate("""() => {
        const root = document.querySelector('#rebasin_compare_grid');
        const img = root.querySelector('img').getBoundingClientRect();
        const band = {top: img.top, bottom: img.top + Math.max(20, img.height * 0.15)};
        return Array.from(root.querySelectorAll('label, [data-testid="block-label"], .label'))
            .filter(e => e.offsetParent !== null)
            .map(e => [e.innerText.trim(), e.getBoundingClientRect()])
            .filter(([t, r]) => r.width > 0 && r.height > 0 && r.left < img.right && r.right > img.left
                                && r.top < band.bottom && r.bottom > band.top)
            .map(([t, r]) => t);
    }""")
    assert covering == []
    _shot(page, tmp_path, "rebasin_compare_grid.png")
    pick(page, "rebasin_compare_pick", "2: alpha 0.7")
    name = page.locator("#rebasin_compare_save_name input, #rebasin_compare_save_name textarea").first
    name.fill("browser_pick")
    name.press("Tab")
    page.click("#rebasin_compare_save")
    page.wait_for_function(
        "() => (document.querySelector('#rebasin_compare_status')||{}).innerText?.includes('browser_pick')",
        timeout=300_000)
    assert (models / "browser_pick.safetensors").is_file()


def test_standalone_compare_section_offers_the_sweep(page):
    page.click("#rebasin_compare")
    page.locator("#rebasin_compare_sweep").first.wait_for(state="visible")
    assert "has none" in page.locator("#rebasin_compare_help").first.inner_text()
    assert page.locator("#rebasin_compare_run").count() == 0 or not page.locator("#rebasin_compare_run").is_visible()
