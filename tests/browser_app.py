"""What the browser tests share (tests/test_browser.py, tests/test_ui_blocks_browser.py): a server of the app
started in its own process, a page of it in Debian's headless Chromium (/usr/bin/chromium, or $REBASIN_CHROMIUM)
driven by Playwright, and picking a gradio dropdown's value."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("REBASIN_CHROMIUM", "/usr/bin/chromium")
ROOT = Path(__file__).resolve().parents[1]
# What Chromium needs on a closed network as root; without the background-networking flags it keeps dialling out.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]


def requirements() -> None:
    """Skip without playwright or Chromium; fail without gradio (the app itself)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("playwright (python package) is not installed: pip install playwright")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"chromium is not installed at {CHROMIUM}: apt-get install -y chromium")
    try:
        import gradio  # noqa: F401
    except ImportError:
        pytest.fail("gradio is not installed, but the browser test needs the standalone app")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(cmd: list[str], url: str, log: Path, env_extra: dict[str, str] | None = None) -> Iterator[None]:
    """Run a server process (this checkout first on its path), wait until `url` answers, yield, then stop it."""
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": str(ROOT) + os.pathsep +
           os.environ.get("PYTHONPATH", ""), "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
           **(env_extra or {})}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"server did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    try:
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextmanager
def standalone(models: Path, log: Path) -> Iterator[str]:
    """The standalone app serving `models`: its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    with serve([sys.executable, "-m", "lib_rebasin.ui.standalone", "--models-dir", str(models), "--port",
                str(port)], url, log):
        yield url


@contextmanager
def open_page(url: str, height: int = 1300) -> Iterator:
    """A Playwright page at `url` in headless Chromium, closed after the caller's block."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        pg = browser.new_page(viewport={"width": 1400, "height": height})
        pg.set_default_timeout(30_000)
        try:
            pg.goto(url)
            yield pg
        finally:
            browser.close()


def pick(page, elem_id: str, title: str) -> None:
    """Choose `title` in a gradio dropdown (3.41 and 4.x both render an input plus an options list)."""
    box = page.locator(f"#{elem_id} input").first
    box.click()
    box.fill(title)
    option = page.locator("ul.options li", has_text=title).first
    option.wait_for(state="visible")
    option.click()
    page.wait_for_timeout(300)
    assert box.input_value() == title
