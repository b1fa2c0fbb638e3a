"""The tab's gradio-free parts: output-name safety, request parsing, validation, jobs, presets, rendering.

These run without gradio; `lib_rebasin.ui` must not import it (or the WebUI) at import time.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lib_rebasin.errors import RebasinError
from lib_rebasin.ui.host import HIRES_PRESETS, hires_values, pick_upscaler, scan_checkpoints
from lib_rebasin.ui.request import MergeRequest
from lib_rebasin.ui.service import MergeService
from lib_rebasin.ui.job import format_eta
from lib_rebasin.ui.naming import output_path_for
from lib_rebasin.ui.standalone import StandaloneHost

ROOT = Path(__file__).resolve().parents[1]


def test_ui_package_imports_without_gradio_or_webui():
    code = ("import sys; import lib_rebasin.ui, lib_rebasin.ui.host, lib_rebasin.ui.service, lib_rebasin.ui.tab, "
            "lib_rebasin.ui.api, lib_rebasin.ui.standalone; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('gradio', 'modules', 'fastapi')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.parametrize("name", ["../x", "..", "a/b", "a\\b", "/abs/path", "bad:name", "q?", "x.ckpt", ".hidden",
                                  "trail.", "CON", "nul.safetensors", "tab\tname"])
def test_output_names_that_escape_or_are_invalid_are_refused(tmp_path, name):
    with pytest.raises(RebasinError):
        output_path_for(name, tmp_path, "default")


def test_output_name_gets_safetensors_and_stays_in_folder(tmp_path):
    assert output_path_for("my merge", tmp_path, "d") == tmp_path / "my merge.safetensors"
    assert output_path_for("m.safetensors", tmp_path, "d") == tmp_path / "m.safetensors"
    assert output_path_for("  ", tmp_path, "auto_name") == tmp_path / "auto_name.safetensors"


def test_request_from_json_is_strict():
    r = MergeRequest.from_dict({"model_a": "a", "model_b": "b", "alpha": 0.3, "iterations": 3, "parts": "unet,te"})
    assert (r.alpha, r.iterations, r.parts) == (0.3, 3, ("unet", "te"))
    assert r.tolerance == 0.01 and MergeRequest.from_dict({"tolerance": 0}).tolerance == 0.0
    assert MergeRequest.from_dict({"iterations": 2.0}).iterations == 2  # a whole JSON number is fine


@pytest.mark.parametrize("body,field", [
    ('{"iterations": 1e400}', "iterations"),          # JSON overflow: inf
    ('{"iterations": "3"}', "iterations"),            # a string for a number
    ('{"iterations": 1.5}', "iterations"),
    ('{"iterations": 0}', "iterations"),
    ('{"iterations": 100000000}', "iterations"),
    ('{"iterations": true}', "iterations"),
    ('{"alpha": [0.5]}', "alpha"),
    ('{"alpha": NaN}', "alpha"),
    ('{"alpha": 1.5}', "alpha"),
    ('{"alpha": 1e308, "method": "add_difference"}', "alpha"),
    ('{"tolerance": "x"}', "tolerance"),
    ('{"tolerance": 1}', "tolerance"),
    ('{"seed": -1}', "seed"),
    ('{"seed": 1' + '0' * 4000 + '}', "seed"),        # a huge integer: never printed in full
    ('{"overwrite": "yes"}', "overwrite"),
    ('{"parts": [1, 2]}', "parts"),
    ('{"parts": {"unet": 1}}', "parts"),
    ('{"model_a": 5}', "model_a"),
    ('{"model_a": "' + 'x' * 5000 + '"}', "model_a"),
    ('{"device": ["cpu"]}', "device"),
    ('{"nope": 1}', "nope"),
    ('[]', "body"),
])
def test_wrong_types_and_ranges_name_the_field_in_a_short_message(body, field):
    import json

    from lib_rebasin.errors import FieldError

    with pytest.raises(FieldError) as e:
        MergeRequest.from_dict(json.loads(body))
    assert e.value.field == field
    assert field in str(e.value) or field == "body"
    assert len(str(e.value)) < 300  # a large value is never echoed back


def test_scan_skips_vae_hidden_and_temp_files(tmp_path):
    for n in ("a.safetensors", "b.ckpt", "x.vae.safetensors", ".a.safetensors.123.tmp", "notes.txt"):
        (tmp_path / n).write_bytes(b"")
    assert [e.title for e in scan_checkpoints(tmp_path)] == ["a.safetensors", "b.ckpt"]


def test_upscaler_pick_exists_and_respects_a_deliberate_choice():
    choices = ["Latent", "Latent (nearest)", "None", "Lanczos", "ESRGAN_4x"]
    assert pick_upscaler(choices, "Latent") == "ESRGAN_4x"
    assert pick_upscaler(choices, "Lanczos") == "Lanczos"
    assert pick_upscaler([("Latent", "Latent"), ("R-ESRGAN 4x+", "R-ESRGAN 4x+")], None) == "R-ESRGAN 4x+"
    assert pick_upscaler(["Latent"], None) == "Latent"
    assert pick_upscaler([], None) is None


def test_presets_follow_the_model_card():
    assert [p.denoise for p in HIRES_PRESETS] == [0.45, 0.55, 0.70]
    for p in HIRES_PRESETS:
        v = hires_values(p, ["Latent", "R-ESRGAN 4x+"], None)
        assert v == {"enable": True, "denoise": p.denoise, "scale": 2.0, "upscaler": "R-ESRGAN 4x+", "steps": 0}
        assert 0.45 <= v["denoise"] <= 0.7


def test_eta_format():
    assert format_eta(None) == "" and format_eta(5) == "5s" and format_eta(75) == "1m 15s"
    assert format_eta(3700) == "1h 01m"


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    from model_cache import cached_checkpoint

    d = tmp_path_factory.mktemp("models")
    cached_checkpoint(d / "one.safetensors", "tiny", seed=1, base_seed=0)
    cached_checkpoint(d / "two.safetensors", "tiny", seed=2, base_seed=0)
    return d


def test_standalone_service_merges_loads_and_refuses_a_second_job(two_models):
    host = StandaloneHost(two_models, devices=["cpu"])
    svc = MergeService(host)
    assert svc.titles() == ["one.safetensors", "two.safetensors"]
    req = MergeRequest(model_a="one.safetensors", model_b="two", output_name="svc_merge", device="cpu")
    job = svc.submit(req)
    with pytest.raises(RebasinError, match="already running"):
        svc.start(svc.prepare(MergeRequest(model_a="one.safetensors", model_b="two.safetensors",
                                           output_name="other", device="cpu")))
    try:
        assert job.wait(300)
        assert job.status == "done", job.error
        d = job.to_dict()
        assert d["fraction"] == 1.0 and d["summary"] and d["output"].endswith("svc_merge.safetensors")
        assert "svc_merge.safetensors" in svc.titles()  # the host rescanned after the save
        assert host.load_checkpoint(job.output) == "svc_merge.safetensors" and host.active == job.output
        with pytest.raises(RebasinError, match="already exists"):
            svc.prepare(req)
    finally:
        (two_models / "svc_merge.safetensors").unlink(missing_ok=True)


def test_the_requested_tolerance_reaches_the_merge_and_a_bad_one_is_refused(two_models):
    svc = MergeService(StandaloneHost(two_models, devices=["cpu"]))
    prepared = svc.prepare(MergeRequest(model_a="one.safetensors", model_b="two.safetensors", output_name="tol",
                                        device="cpu", tolerance=0.0))
    assert prepared.options.tolerance == 0.0  # the paper's stopping rule, on request
    with pytest.raises(RebasinError, match="tolerance"):
        svc.prepare(MergeRequest(model_a="one.safetensors", model_b="two.safetensors", output_name="tol",
                                 device="cpu", tolerance=1.5))


def test_unsupported_model_is_refused_by_preflight(two_models, tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(two_models / "zz_notsd.safetensors"))
    try:
        svc = MergeService(StandaloneHost(two_models, devices=["cpu"]))
        with pytest.raises(RebasinError) as e:
            svc.prepare(MergeRequest(model_a="one.safetensors", model_b="zz_notsd.safetensors", device="cpu"))
        assert "zz_notsd" in str(e.value) or "Stable Diffusion" in str(e.value) or "SD" in str(e.value)
    finally:
        (two_models / "zz_notsd.safetensors").unlink()
