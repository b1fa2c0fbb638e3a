"""Smoke test: the tab builds and the standalone app launches under the installed gradio (3.41.x or 4.x)."""

from __future__ import annotations

import json
import urllib.request

import pytest

gr = pytest.importorskip("gradio")


def test_gradio_is_a_supported_version():
    major, minor = (int(x) for x in gr.__version__.split(".")[:2])
    assert (major, minor) >= (3, 41) and major <= 4, gr.__version__


def test_tab_builds_and_standalone_launches(tmp_path):
    from lib_rebasin.synthetic import make_checkpoint
    from lib_rebasin.ui.standalone import launch
    from lib_rebasin.ui.tab import js_kwargs

    make_checkpoint(tmp_path / "a.safetensors", "mini", seed=1, base_seed=0)
    assert list(js_kwargs("() => 0")) == (["js"] if int(gr.__version__.split(".")[0]) >= 4 else ["_js"])
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    blocks, service, url = launch(tmp_path, port=port, block=False)
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            assert r.status == 200
        with urllib.request.urlopen(url.rstrip("/") + "/rebasin/v1/checkpoints", timeout=10) as r:
            assert [c["title"] for c in json.loads(r.read())] == ["a.safetensors"]
        config = blocks.get_config_file()
        ids = {c.get("props", {}).get("elem_id") for c in config["components"]}
        assert {"rebasin_model_a", "rebasin_merge", "rebasin_stop", "rebasin_load", "rebasin_progress"} <= ids
    finally:
        blocks.close()
