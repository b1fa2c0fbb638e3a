"""Smoke test: the tab builds and the standalone app launches under the installed gradio (3.41.x or 4.x)."""

from __future__ import annotations

import json
import urllib.request

import pytest

from gradio_events import fn_for

gr = pytest.importorskip("gradio")

pytestmark = pytest.mark.ui


def test_gradio_is_a_supported_version():
    major, minor = (int(x) for x in gr.__version__.split(".")[:2])
    assert (major, minor) >= (3, 41) and major <= 4, gr.__version__


def test_tab_builds_and_standalone_launches(tmp_path):
    from model_cache import cached_checkpoint

    from lib_rebasin.ui.standalone import launch
    from lib_rebasin.ui.tab.compat import js_kwargs

    cached_checkpoint(tmp_path / "a.safetensors", "tiny", seed=1, base_seed=0)
    assert list(js_kwargs("() => 0")) == (["js"] if int(gr.__version__.split(".")[0]) >= 4 else ["_js"])
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    blocks, service, url = launch(tmp_path, port=port, block=False, api=True)
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


_fn_for = fn_for


def test_recipe_section_builds_runs_and_loads_back(tmp_path):
    from model_cache import cached_checkpoint

    from lib_rebasin.recipe.parse import parse_recipe
    from lib_rebasin.ui.service import MergeService
    from lib_rebasin.ui.standalone import StandaloneHost
    from lib_rebasin.ui.tab import build_tab

    for i, n in enumerate(("one", "two", "three"), 1):
        cached_checkpoint(tmp_path / f"{n}.safetensors", "tiny", seed=i, base_seed=1)
    host = StandaloneHost(tmp_path, devices=["cpu"])
    ui = build_tab(host, MergeService(host))
    method = ui["recipe_method"].value
    parts = ["Text encoder", "VAE"]
    add = _fn_for(ui.blocks, ui["recipe_add"])
    settings = dict(recipe_name="tab chain", recipe_precision="fp16", recipe_device="cpu", recipe_seed=0)
    out = add(ui.values(recipe_text="", **settings, recipe_step=None, recipe_method=method, recipe_a="one.safetensors",
                        recipe_b="two.safetensors", recipe_c=None, recipe_alpha=0.3, recipe_iterations=2,
                        recipe_parts=parts, recipe_step_name=""))
    text, overview, err, step_sel = out[:4]
    assert err == "" and "step1" in overview and step_sel["value"] == "1. step1"
    assert "[step] step1" in out[4]["choices"]
    out = add(ui.values(recipe_text=text, **settings, recipe_step=None, recipe_method=method,
                        recipe_a="[step] step1", recipe_b="three.safetensors", recipe_c=None, recipe_alpha=0.5,
                        recipe_iterations=1, recipe_parts=parts, recipe_step_name=""))
    text = out[0]
    assert [s.name for s in parse_recipe(text).steps] == ["step1", "step2"]
    # moving step2 above step1 is refused with the core's message, text unchanged
    up = _fn_for(ui.blocks, ui["recipe_up"])
    out = up(ui.values(recipe_text=text, **settings, recipe_step="2. step2", recipe_method=method, recipe_a=None,
                       recipe_b=None, recipe_c=None, recipe_alpha=0.5, recipe_iterations=1, recipe_parts=parts,
                       recipe_step_name=""))
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
    run_values = dict(recipe_name="tab chain", recipe_precision="fp16", recipe_device="cpu", recipe_seed=0,
                      recipe_output_name="", recipe_overwrite=False, model_a=None, model_b=None, model_c=None,
                      recipe_meta_model=None)
    frames = list(run(ui.values(task_id="task(r1)", recipe_text=text, **run_values)))
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
    frames = list(run(ui.values(task_id="task(r2)", recipe_text=text, **run_values)))
    assert len(frames) == 1 and "already exists" in frames[0][0]


def _ready_line_within(proc, seconds: float) -> str:
    """The app's ready line ("Re-Basin standalone: ..."), skipping what gradio prints before it (gradio 3 prints
    its own "Running on local URL"), or "" if none comes in time: a test must never hang CI."""
    import threading

    found: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            if line.startswith("Re-Basin standalone:"):
                found.append(line)
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(seconds)
    return found[0] if found else ""


def test_standalone_app_stops_on_sigterm_with_one_line(tmp_path):
    """SIGTERM stops the standalone app like Ctrl-C: a clean stop, one line, a non-zero exit (not a kill)."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from model_cache import cached_checkpoint

    cached_checkpoint(tmp_path / "a.safetensors", "tiny", seed=1, base_seed=0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False",
           "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "lib_rebasin", "ui", "--models-dir", str(tmp_path), "--port",
                             str(port)], cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = _ready_line_within(proc, 120)  # printed once the server is up
        if not line.startswith("Re-Basin standalone:"):
            proc.kill()
            pytest.fail("the app printed no ready line: " + line + proc.communicate(timeout=30)[1])
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, err
    assert err.strip().splitlines()[-1] == "Stopped: no merge was running.", err
    assert "Traceback" not in err
def _load_fn(blocks):
    """The page-load listener (gradio 3 gives load events no target; gradio 4 targets the Blocks itself)."""
    for i, dep in enumerate(blocks.get_config_file()["dependencies"]):
        targets = dep.get("targets", [])
        if dep.get("trigger") == "load" or any(isinstance(t, (list, tuple)) and t[1] == "load" for t in targets):
            return blocks.fns[i].fn
    raise AssertionError("no load listener")


def _builder(tmp_path):
    from model_cache import cached_checkpoint

    from lib_rebasin.ui.service import MergeService
    from lib_rebasin.ui.standalone import StandaloneHost
    from lib_rebasin.ui.tab import build_tab

    for i, n in enumerate(("one", "two", "three"), 1):
        cached_checkpoint(tmp_path / f"{n}.safetensors", "tiny", seed=i, base_seed=1)
    host = StandaloneHost(tmp_path, devices=["cpu"])
    service = MergeService(host)
    return host, service, build_tab(host, service)


def test_second_add_step_gets_a_new_name(tmp_path):
    """The events as the page runs them: Add, then the step selector's change fills the form (name "step1"),
    then Add again with that form: a second step "step2", not a refusal."""
    from lib_rebasin.recipe.parse import parse_recipe

    _host, _service, ui = _builder(tmp_path)
    add = _fn_for(ui.blocks, ui["recipe_add"])
    select = _fn_for(ui.blocks, ui["recipe_step"], "change")
    method, parts = ui["recipe_method"].value, ["Text encoder", "VAE"]
    settings = dict(recipe_name="chain", recipe_precision="fp16", recipe_device="cpu", recipe_seed=0,
                    recipe_method=method, recipe_c=None, recipe_iterations=1, recipe_parts=parts)
    out = add(ui.values(recipe_text="", **settings, recipe_step=None, recipe_a="one.safetensors",
                        recipe_b="two.safetensors", recipe_alpha=0.3, recipe_step_name=""))
    text, selected = out[0], out[3]["value"]
    form = select(text, selected)
    name = form[7]
    assert name == "step1"
    out = add(ui.values(recipe_text=text, **settings, recipe_step=selected, recipe_a="[step] step1",
                        recipe_b="three.safetensors", recipe_alpha=0.5, recipe_step_name=name))
    assert out[2] == "", out[2]
    assert [s.name for s in parse_recipe(out[0]).steps] == ["step1", "step2"]
    # a name the user typed that another step already has is still refused
    out2 = add(ui.values(recipe_text=out[0], **settings, recipe_step=out[3]["value"], recipe_a="one.safetensors",
                         recipe_b="three.safetensors", recipe_alpha=0.5, recipe_step_name="step1"))
    assert "already used" in out2[2]


def test_iterations_and_tolerance_show_only_for_methods_that_use_them(tmp_path):
    from lib_rebasin.methods import METHODS

    _host, _service, ui = _builder(tmp_path)
    on_method = _fn_for(ui.blocks, ui["method"], "change")
    shown = {key: (u[-2]["visible"], u[-1]["visible"]) for key, u in
             ((k, on_method(m.label)) for k, m in METHODS.items())}
    assert shown == {k: {"rebasin": (True, True), "legacy": (True, False)}.get(k, (False, False)) for k in METHODS}
    recipe_method = _fn_for(ui.blocks, ui["recipe_method"], "change")
    assert recipe_method(METHODS["weighted_sum"].label)[1]["visible"] is False
    assert recipe_method(METHODS["legacy"].label)[1]["visible"] is True


def test_reloaded_page_follows_the_running_job_and_stop_leaves_nothing_stale(tmp_path):
    from lib_rebasin.ui.request import MergeRequest

    host, service, ui = _builder(tmp_path)
    resume = _load_fn(ui.blocks)
    idle = list(resume(None, None, None))
    assert len(idle) == 1 and all(isinstance(u, dict) and "value" not in u for u in idle[0])
    with host._queue:  # another job holds the app's queue: ours waits, as a long merge would run
        job = service.submit(MergeRequest("one.safetensors", "two.safetensors", method="weighted_sum",
                                          parts=("te", "vae"), output_name="reloaded"))
        frames = resume(None, None, None)  # the page was reloaded
        first = next(frames)
        assert "rebasin-progress" in first[1] and first[5]["interactive"] is False
        # the reloaded page's Model A / B are empty: the status line names what runs
        assert "A one.safetensors, B two.safetensors · " in first[1], first[1]
    from lib_rebasin.ui.tab.rendering import job_inputs

    assert job_inputs({"recipe": "chain", "models": {"a": "one.safetensors", "b": "two.safetensors",
                                                    "c": "one.safetensors"}}) == \
        "Recipe chain (one.safetensors, two.safetensors)"
    frames = [first, *frames]
    last = frames[-1]
    assert job.status == "done" and "rebasin-done" in last[1] and "reloaded.safetensors" in last[2]
    stop = _fn_for(ui.blocks, ui["stop"])
    assert stop() == "Nothing is running."
    with host._queue:
        job = service.submit(MergeRequest("one.safetensors", "two.safetensors", method="weighted_sum",
                                          parts=("te", "vae"), output_name="stopped"))
        assert stop() == ""  # the progress line says "Stopping..." while it winds down
        assert "Stopping" in job.status_line()
    assert job.wait(60) and job.status == "cancelled" and "Stopping" not in job.status_line()


def test_stop_once_the_output_is_committed_says_it_is_too_late(tmp_path, monkeypatch):
    from lib_rebasin.io import output_file
    from lib_rebasin.ui.request import MergeRequest

    host, service, ui = _builder(tmp_path)
    stop = _fn_for(ui.blocks, ui["stop"])
    said = []
    real = output_file.place_output

    def place(*args, **kwargs):  # Stop pressed right after the output got its final name
        real(*args, **kwargs)
        said.append(stop())

    monkeypatch.setattr(output_file, "place_output", place)
    job = service.submit(MergeRequest("one.safetensors", "two.safetensors", method="weighted_sum",
                                      parts=("te", "vae"), output_name="late"))
    assert job.wait(60) and job.status == "done" and (tmp_path / "late.safetensors").is_file()
    assert said == ["Too late to cancel: late.safetensors is being saved; the merge ends done."]


def test_one_eta_where_the_host_draws_its_own_bar():
    from lib_rebasin.ui.job import Job

    job = Job("task(x)", prepared=None, status="running", fraction=0.5, message="matching", eta_s=75)
    assert "ETA 1m 15s" in job.status_line() and "ETA" not in job.status_line(eta=False)


def test_recipe_step_buttons_never_wrap():
    from lib_rebasin.ui.tab.rendering import tab_css

    assert "#rebasin_recipe_step_buttons button { white-space: nowrap;" in tab_css()


@pytest.mark.parametrize("button", ["merge", "recipe_run", "compare_run"])
def test_start_hook_writes_the_task_id_into_the_task_id_input(tmp_path, button):
    """Merge and Run recipe read their inputs by name (gradio passes a set of inputs as one dict, ordered by
    component id); javascript/rebasin.js must put the WebUI task id at task_id's place among the values it gets."""
    import re

    from lib_rebasin.ui.service import MergeService
    from lib_rebasin.ui.standalone import StandaloneHost
    from lib_rebasin.ui.tab import build_tab

    host = StandaloneHost(tmp_path, devices=["cpu"])  # no checkpoints needed to build the tab
    ui = build_tab(host, MergeService(host))
    deps = [d for d in ui.blocks.get_config_file()["dependencies"]
            if ui[button]._id in [t[0] if isinstance(t, (list, tuple)) else t for t in d["targets"]]]
    assert len(deps) == 1
    js = deps[0].get("js") or deps[0].get("_js")
    position = int(re.search(r"rebasin_start_merge\((\d+), args[,)]", js).group(1))
    assert deps[0]["inputs"][position] == ui["task_id"]._id


def test_advanced_options_come_from_the_option_table(tmp_path):
    """The table's advanced options that the form does not place itself get a control each (max_sweeps,
    allow_nonfinite), starting at the option's default and shown for the methods the option applies to."""
    from lib_rebasin.methods import METHODS
    from lib_rebasin.options import OPTIONS
    from lib_rebasin.ui.service import MergeService
    from lib_rebasin.ui.standalone import StandaloneHost
    from lib_rebasin.ui.tab import build_tab
    from lib_rebasin.ui.tab.controls import ADVANCED

    assert {"max_sweeps", "allow_nonfinite"} <= set(ADVANCED)
    host = StandaloneHost(tmp_path, devices=["cpu"])
    ui = build_tab(host, MergeService(host))
    config = ui.blocks.get_config_file()
    props = {c["props"].get("elem_id"): c["props"] for c in config["components"]}
    for name in ADVANCED:
        assert props[f"rebasin_{name}"]["value"] == OPTIONS[name].default, name
    on_method = _fn_for(ui.blocks, ui["method"], "change")
    dep = next(d for d in config["dependencies"] if ui["method"]._id in
               [t[0] if isinstance(t, (list, tuple)) else t for t in d["targets"]] and
               ui["max_sweeps"]._id in d["outputs"])
    for key, info in METHODS.items():
        shown = dict(zip(dep["outputs"], on_method(info.label)))
        for name in ADVANCED:
            assert shown[ui[name]._id]["visible"] is OPTIONS[name].applies_to(info), (key, name)
