"""The HTTP API's sweep route (ui/sweep_job.py) in process: one file per alpha, each the single merge's bytes as the
API writes it; bad values refused as 422 naming the field before anything runs; a cancel keeps finished files."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from model_cache import place  # noqa: E402

from lib_rebasin.ui.api import register_api  # noqa: E402
from lib_rebasin.ui.service import MergeService  # noqa: E402
from lib_rebasin.ui.standalone import StandaloneHost  # noqa: E402


class _Host(StandaloneHost):
    """Calls `on_progress(text)` with each progress message (a test's hook for a cancel at a chosen point)."""

    on_progress = None

    def report_progress(self, fraction: float, text: str) -> None:
        if self.on_progress is not None:
            self.on_progress(text)


@pytest.fixture(scope="module")
def inputs(tiny_models_without_vae: dict[str, Path]) -> dict[str, Path]:
    """The tiny models without their VAE: what is tested is the route, not what the files hold, and each file is
    then half the bytes."""
    return {name: tiny_models_without_vae[name] for name in ("a", "independent")}


@pytest.fixture
def api(tmp_path: Path, inputs: dict[str, Path]):
    from fastapi import FastAPI

    folder = tmp_path / "models"
    folder.mkdir()
    place(inputs["a"], folder / "a.safetensors")
    place(inputs["independent"], folder / "b.safetensors")
    host = _Host(folder, devices=["cpu"])
    service = MergeService(host)
    app = FastAPI()
    register_api(app, service)

    def call(method: str, path: str, body=None, headers=None, content=None):
        async def one():
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:7860") as c:
                return await c.request(method, "/rebasin/v1" + path, json=body, headers=headers, content=content)

        return asyncio.run(one())

    def finished(job_id: str) -> dict:
        deadline = time.time() + 300
        while True:
            j = call("GET", f"/jobs/{job_id}").json()
            if j["finished"] or time.time() > deadline:
                return j
            time.sleep(0.1)

    return call, finished, folder, host, service


# A precision other than the default, so that the files show the route passes the request's options on; bf16 rather
# than fp32: half the bytes written.
BODY = {"model_a": "a.safetensors", "model_b": "b.safetensors", "method": "rebasin", "precision": "bf16"}


def test_sweep_route_writes_the_single_merges(api):
    call, finished, folder, _, _ = api
    r = call("POST", "/sweep", {**BODY, "alpha": [0.3, 0.6], "output_name": "s_{alpha}"})
    assert r.status_code == 202, r.text
    j = finished(r.json()["job_id"])
    assert j["status"] == "done" and j["kind"] == "sweep", j
    assert [Path(p).name for p in j["outputs"]] == ["s_0.3.safetensors", "s_0.6.safetensors"]
    assert j["request"]["alpha"] == [0.3, 0.6] and "s_0.6.safetensors" in j["status_line"]
    r = call("POST", "/merge", {**BODY, "alpha": 0.6, "output_name": "single"})
    assert r.status_code == 202 and finished(r.json()["job_id"])["status"] == "done"
    assert (folder / "s_0.6.safetensors").read_bytes() == (folder / "single.safetensors").read_bytes()


@pytest.mark.parametrize("body, field, words", [
    ({"alpha": [0.3, 1.2], "output_name": "x_{alpha}"}, "alpha", "alpha value 2 of 2"),
    ({"alpha": [0.3, "0.6"], "output_name": "x_{alpha}"}, "alpha", "must be a number"),
    ({"alpha": [0.3, 0.6], "output_name": "x"}, "output_name", "must contain {alpha}"),
    ({"alpha": [0.3, 0.6], "output_name": "x/{alpha}"}, "output_name", "outside the checkpoint folder"),
    ({"alpha": [0.301, 0.302], "output_name": "x_{alpha:.2f}"}, "output_name", "the same output name"),
    ({"alpha": [], "output_name": "x_{alpha}"}, "alpha", "needs 'alpha'"),
])
def test_sweep_route_refuses_bad_values_before_anything_runs(api, body, field, words):
    call, _, folder, _, service = api
    r = call("POST", "/sweep", {**BODY, **body})
    assert r.status_code == 422 and r.json()["field"] == field and words in r.json()["detail"], r.text
    assert sorted(p.name for p in folder.iterdir()) == ["a.safetensors", "b.safetensors"] and not service.jobs


def test_sweep_cancel_keeps_the_finished_files(api):
    call, finished, folder, host, _ = api
    job_ids: list[str] = []

    def on_progress(text: str) -> None:
        if text.startswith("alpha 0.6 (2/3): writing") and job_ids:
            call("POST", f"/jobs/{job_ids[0]}/cancel", {})

    host.on_progress = on_progress
    r = call("POST", "/sweep", {**BODY, "method": "weighted_sum", "alpha": [0.3, 0.6, 0.9], "output_name": "c_{alpha}"})
    job_ids.append(r.json()["job_id"])
    j = finished(job_ids[0])
    assert j["status"] == "cancelled", j
    assert [Path(p).name for p in j["outputs"]] == ["c_0.3.safetensors"]
    assert sorted(p.name for p in folder.iterdir()) == ["a.safetensors", "b.safetensors", "c_0.3.safetensors"]
    assert "kept the finished file(s) c_0.3.safetensors" in j["status_line"]


def test_sweep_route_has_the_merge_routes_guards(api):
    """Another site's page, or a body that is not JSON, starts nothing (the same checks as POST /merge)."""
    call, _, folder, _, service = api
    body = {**BODY, "alpha": [0.3, 0.6], "output_name": "g_{alpha}"}
    r = call("POST", "/sweep", body, headers={"Origin": "http://evil.example"})
    assert r.status_code == 403 and "another site" in r.json()["detail"]
    r = call("POST", "/sweep", content=b'{"alpha": [0.3]}', headers={"Content-Type": "text/plain"})
    assert r.status_code == 415
    assert sorted(p.name for p in folder.iterdir()) == ["a.safetensors", "b.safetensors"] and not service.jobs
