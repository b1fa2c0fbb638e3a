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
        assert {"rebasin_recipe_text", "rebasin_recipe_add", "rebasin_recipe_up", "rebasin_recipe_down",
                "rebasin_recipe_remove", "rebasin_recipe_apply", "rebasin_recipe_meta_load", "rebasin_recipe_run",
                "rebasin_recipe_stop"} <= ids
    finally:
        blocks.close()


def _fn_for(blocks, component, event="click"):
    for i, dep in enumerate(blocks.get_config_file()["dependencies"]):
        targets = [t[0] if isinstance(t, (list, tuple)) else t for t in dep.get("targets", [])]
        trigger = dep.get("trigger") or (dep["targets"][0][1] if dep.get("targets") and
                                         isinstance(dep["targets"][0], (list, tuple)) else None)
        if component._id in targets and trigger == event:
            return blocks.fns[i].fn
    raise AssertionError(f"no {event} listener on {component}")


def test_recipe_section_builds_runs_and_loads_back(tmp_path):
    from lib_rebasin.recipe import parse_recipe
    from lib_rebasin.synthetic import make_checkpoint
    from lib_rebasin.ui.service import MergeService
    from lib_rebasin.ui.standalone import StandaloneHost
    from lib_rebasin.ui.tab import build_tab

    for i, n in enumerate(("one", "two", "three"), 1):
        make_checkpoint(tmp_path / f"{n}.safetensors", "mini", seed=i, base_seed=1)
    host = StandaloneHost(tmp_path, devices=["cpu"])
    ui = build_tab(host, MergeService(host))
    method = ui["recipe_method"].value
    parts = ["Text encoder", "VAE"]
    add = _fn_for(ui.blocks, ui["recipe_add"])
    settings = ["", "tab chain", "fp16", "cpu", 0]
    out = add(*settings, None, method, "one.safetensors", "two.safetensors", None, 0.3, 2, parts, "")
    text, overview, err, step_sel = out[:4]
    assert err == "" and "step1" in overview and step_sel["value"] == "1. step1"
    assert "[step] step1" in out[4]["choices"]
    out = add(text, "tab chain", "fp16", "cpu", 0, None, method, "[step] step1", "three.safetensors", None, 0.5, 1,
              parts, "")
    text = out[0]
    assert [s.name for s in parse_recipe(text).steps] == ["step1", "step2"]
    # moving step2 above step1 is refused with the core's message, text unchanged
    up = _fn_for(ui.blocks, ui["recipe_up"])
    out = up(text, "tab chain", "fp16", "cpu", 0, "2. step2", method, None, None, None, 0.5, 1, parts, "")
    assert "later step" in out[2] and isinstance(out[0], dict)
    # apply text: a bad reference names its line
    apply = _fn_for(ui.blocks, ui["recipe_apply"])
    bad = apply(text.replace('b = "three"', 'b = "nowhere"'))
    assert "line" in bad[2] and "nowhere" in bad[2]
    # select a step fills the editor
    sel = _fn_for(ui.blocks, ui["recipe_step"], "change")(text, "2. step2")
    assert sel[1]["value"] == "[step] step1" and sel[2]["value"] == "three.safetensors"
    # run the whole chain with the shared progress / result / load outputs
    run = _fn_for(ui.blocks, ui["recipe_run"])
    frames = list(run("task(r1)", text, "tab chain", "fp16", "cpu", 0, "", False, None, None, None, None))
    last = frames[-1]
    assert last[0] == "" and "rebasin-done" in last[1] and "Step step2" in last[2], last[:3]
    assert last[3].endswith("tab_chain.safetensors") and last[4]["interactive"] is True
    assert "tab_chain.safetensors" in last[7]["choices"]
    # load its recipe back from the metadata
    loaded = _fn_for(ui.blocks, ui["recipe_meta_load"])("tab_chain.safetensors")
    assert loaded[2] == "" and [s.name for s in parse_recipe(loaded[0]).steps] == ["step1", "step2"]
    nometa = _fn_for(ui.blocks, ui["recipe_meta_load"])("one.safetensors")
    assert "not made by lib_rebasin" in nometa[2]
    # a second run into the same name is refused before any work
    frames = list(run("task(r2)", text, "tab chain", "fp16", "cpu", 0, "", False, None, None, None, None))
    assert len(frames) == 1 and "already exists" in frames[0][0]


def test_standalone_app_stops_on_sigterm_with_one_line(tmp_path):
    """SIGTERM stops the standalone app like Ctrl-C: a clean stop, one line, a non-zero exit (not a kill)."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from lib_rebasin.synthetic import make_checkpoint

    make_checkpoint(tmp_path / "a.safetensors", "mini", seed=1, base_seed=0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False",
           "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "lib_rebasin", "ui", "--models-dir", str(tmp_path), "--port",
                             str(port)], cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # printed once the server is up
        assert line.startswith("Re-Basin standalone:"), line + proc.stderr.read()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, err
    assert err.strip().splitlines()[-1] == "Stopped: no merge was running.", err
    assert "Traceback" not in err
