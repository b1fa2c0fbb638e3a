"""The HTTP API against real server processes, with a real HTTP client (urllib):

  - the standalone app (`python -m lib_rebasin.ui.standalone`, gradio + uvicorn on 127.0.0.1),
  - the WebUI stand-in server (tests/webui_standin/webui.py: A1111 1.10's startup order, flags and Api auth).

A cross-site page's `text/plain` POST starts nothing and writes nothing; --api-auth gives 401 without credentials,
exactly like the host's /sdapi/v1 routes; with the host's API off the routes do not exist; bad values are 422s
naming the field; bodies are bounded; the checkpoint list has names and hashes, no absolute paths.
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("gradio")

pytestmark = pytest.mark.ui

ROOT = Path(__file__).resolve().parents[1]
STANDIN_SERVER = ROOT / "tests" / "webui_standin" / "webui.py"
EVIL = "http://evil.example"
READY_LINE = re.compile(r"^(Re-Basin standalone|stand-in webui)\b.*http://127\.0\.0\.1", re.M)  # after mounting


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, cmd: list[str], port: int, log: Path, stdin: int | None = None,
                 env_extra: dict[str, str] | None = None) -> None:
        self.port, self.log = port, log
        self.base = f"http://127.0.0.1:{port}"
        # one intra-op thread, as conftest.py sets for in-process tests: on a busy 2-core machine two OpenMP threads
        # made a mini REPAIR merge (small forward passes) take 409 s instead of 18 s
        env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1",
               "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env_extra or {})}
        with open(log, "w") as out:
            self.proc = subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdin=stdin, stdout=out,
                                         stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while True:  # up once it has printed its URL (after mounting the API) and answers HTTP (404 included)
            try:
                if READY_LINE.search(log.read_text()):
                    self.request("GET", "/")
                    break
            except OSError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                pytest.fail(f"server did not start: {cmd}\n{log.read_text()[-3000:]}")
            time.sleep(0.3)

    def request(self, method: str, path: str, body: bytes | str | None = None, headers: dict | None = None,
                user: tuple[str, str] | None = None) -> tuple[int, dict | list | str]:
        data = body.encode() if isinstance(body, str) else body
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=dict(headers or {}))
        if user:
            req.add_header("Authorization", "Basic " + base64.b64encode(f"{user[0]}:{user[1]}".encode()).decode())
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    def post_json(self, path: str, obj, headers: dict | None = None, **kw):
        return self.request("POST", path, json.dumps(obj), {"Content-Type": "application/json", **(headers or {})},
                            **kw)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny fp16 models without their VAE: the merges here (their UNet and text encoder, or less) write half the
    bytes of the models with theirs; what is tested is the API, not the parts."""
    from model_cache import cached_checkpoint, cached_without_parts

    d = tmp_path_factory.mktemp("Stable-diffusion")
    full = tmp_path_factory.mktemp("with_vae")
    for i, name in enumerate(("alpha", "beta", "victim"), 1):  # victim: the checkpoint an attack targets
        cached_without_parts(d / f"{name}.safetensors",
                             cached_checkpoint(full / f"{name}.safetensors", "tiny", seed=i, base_seed=0))
    return d


def _standalone(models, tmp_path_factory, *flags):
    port = _free_port()
    log = tmp_path_factory.mktemp("standalone") / "server.log"
    return Server([sys.executable, "-m", "lib_rebasin.ui.standalone", "--models-dir", str(models), "--port",
                   str(port), *flags], port, log)


def _standin(models, tmp_path_factory, *flags):
    port = _free_port()
    data = tmp_path_factory.mktemp("webui")
    return Server([sys.executable, str(STANDIN_SERVER), "--models-dir", str(models), "--data-dir", str(data),
                   "--port", str(port), *flags], port, data / "server.log")


@pytest.fixture(scope="module")
def standalone_api(models, tmp_path_factory):
    """The standalone app with the API switched on, no credentials, its address given as Gradio's environment
    (GRADIO_SERVER_PORT / GRADIO_SERVER_NAME, no --port): one process for the API tests and the address test."""
    port = _free_port()
    log = tmp_path_factory.mktemp("standalone") / "server.log"
    srv = Server([sys.executable, "-m", "lib_rebasin.ui.standalone", "--models-dir", str(models), "--api"], port, log,
                 env_extra={"GRADIO_SERVER_PORT": str(port), "GRADIO_SERVER_NAME": "127.0.0.1"})
    srv.kind = "standalone"
    yield srv
    srv.stop()


@pytest.fixture(scope="module", params=["standalone", "webui"])
def server(request, models, tmp_path_factory):
    """The API switched on, no credentials; the stand-in also allows one extra origin by the host's CORS flag."""
    if request.param == "standalone":
        yield request.getfixturevalue("standalone_api")
        return
    srv = _standin(models, tmp_path_factory, "--api", "--cors-allow-origins", "http://friend.example")
    srv.kind = request.param
    yield srv
    srv.stop()


def _fingerprint(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


ATTACK = {"model_a": "alpha.safetensors", "model_b": "beta.safetensors", "output_name": "victim", "overwrite": True,
          "iterations": 1}


def test_cross_origin_text_plain_post_starts_nothing_and_writes_nothing(server, models):
    before = _fingerprint(models)
    # What any web page can send without a CORS preflight: a "simple" POST with a text/plain body.
    status, body = server.request("POST", "/rebasin/v1/merge", json.dumps(ATTACK),
                                  {"Content-Type": "text/plain;charset=UTF-8", "Origin": EVIL})
    assert status in (403, 415), (status, body)
    # the same with the right content type but another site's Origin is refused too
    status, body = server.post_json("/rebasin/v1/merge", ATTACK, {"Origin": EVIL})
    assert status == 403 and "another site" in body["detail"]
    # and a same-site text/plain body (no Origin at all, e.g. a script) is still not JSON
    status, body = server.request("POST", "/rebasin/v1/merge", json.dumps(ATTACK), {"Content-Type": "text/plain"})
    assert status == 415
    # a form can't stop a merge either
    status, _ = server.request("POST", "/rebasin/v1/jobs/x/cancel", "", {"Content-Type": "text/plain",
                                                                         "Origin": EVIL})
    assert status in (403, 415)
    time.sleep(1.0)  # a merge that had started would have written its temp file by now
    assert _fingerprint(models) == before


def test_own_origin_and_host_allowed_origins_are_accepted(server):
    same = {"model_a": "alpha.safetensors", "model_b": "alpha.safetensors"}  # refused by validation: nothing runs
    status, body = server.post_json("/rebasin/v1/merge", same, {"Origin": server.base})
    assert status == 400 and "same file" in body["detail"]
    status, body = server.post_json("/rebasin/v1/merge", same, {"Origin": "http://friend.example"})
    assert status == (400 if server.kind == "webui" else 403), body


def test_no_route_changes_state_on_get(server):
    for path in ("/rebasin/v1/merge", "/rebasin/v1/load", "/rebasin/v1/jobs/x/cancel"):
        status, _ = server.request("GET", path)
        assert status in (404, 405), path


def test_bad_values_are_422_naming_the_field_never_500(server):
    cases = [('{"model_a": "alpha.safetensors", "model_b": "beta.safetensors", "iterations": 1e400}', "iterations"),
             ('{"iterations": "3"}', "iterations"), ('{"alpha": [0.5]}', "alpha"), ('{"seed": true}', "seed"),
             ('{"parts": "unet,brain"}', "parts"), ('{"bogus": 1}', "bogus"),
             ('{"model_a": "alpha.safetensors", "model_b": "beta.safetensors", "device": "tpu"}', "device"),
             ('{"matching": "activation"}', "matching"), ('{"matching": 1}', "matching"),
             ('{"activation_samples": 0}', "activation_samples"), ('{"activation_samples": 2.5}', "activation_samples"),
             ('{"repair": 1}', "repair"), ('{"repair": "true"}', "repair"),
             ('{"method": "add_difference", "repair": true}', "repair"),
             ('{"parts": ["te"], "repair": true}', "repair")]
    for raw, field in cases:
        status, body = server.request("POST", "/rebasin/v1/merge", raw, {"Content-Type": "application/json"})
        assert status == 422 and body["field"] == field, (raw, status, body)
    status, body = server.request("POST", "/rebasin/v1/load", '{"path": ["x"]}', {"Content-Type": "application/json"})
    assert status == 422 and body["field"] == "path"
    status, body = server.request("POST", "/rebasin/v1/merge", "{not json", {"Content-Type": "application/json"})
    assert status == 400 and "JSON" in body["detail"]


def test_bodies_are_bounded_and_errors_do_not_echo_large_fields(server):
    status, body = server.post_json("/rebasin/v1/merge", {"model_a": "x" * 20_000})
    assert status == 413
    status, body = server.post_json("/rebasin/v1/merge", {"model_a": "y" * 500, "model_b": "beta.safetensors"})
    assert status == 422 and body["field"] == "model_a"  # names nothing in the list
    assert len(body["detail"]) < 300 and "y" * 100 not in body["detail"]
    for depth in (100, 960, 3000):  # parseable or not, a body nested this deep is one 400, never a 500
        deep = '{"model_a": ' + "[" * depth + "]" * depth + "}"
        status, body = server.request("POST", "/rebasin/v1/merge", deep, {"Content-Type": "application/json"})
        assert status == 400 and "nested more than" in body["detail"], (depth, status, body)


def test_checkpoints_lists_names_and_hashes_not_paths(server, models):
    status, listed = server.request("GET", "/rebasin/v1/checkpoints")
    assert status == 200
    assert {c["name"] for c in listed} >= {"alpha.safetensors", "beta.safetensors", "victim.safetensors"}
    for c in listed:
        assert set(c) == {"title", "name", "hash", "sha256"}
        assert str(models) not in json.dumps(c) and not c["name"].startswith("/")


def _merge_to_done(server, body: dict, limit_s: float = 120) -> dict:
    """POST a same-origin merge and poll its job until it is done (or `limit_s` pass: a guard against a hang)."""
    status, job = server.post_json("/rebasin/v1/merge", body, {"Origin": server.base})
    assert status == 202, job
    deadline = time.time() + limit_s
    while not job["finished"] and time.time() < deadline:
        time.sleep(0.3)
        job = server.request("GET", f"/rebasin/v1/jobs/{job['job_id']}")[1]
    assert job["status"] == "done", job
    return job


def test_same_origin_merge_runs_and_then_has_a_hash(server, models):
    _merge_to_done(server, {"model_a": "alpha.safetensors", "model_b": "beta.safetensors", "parts": ["unet", "te"],
                            "method": "weighted_sum", "output_name": f"api_{server.kind}"})
    from lib_rebasin.io.input_file import file_sha256

    out = models / f"api_{server.kind}.safetensors"
    listed = {c["name"]: c for c in server.request("GET", "/rebasin/v1/checkpoints")[1]}
    assert listed[out.name]["sha256"] == file_sha256(out) and listed[out.name]["hash"] == file_sha256(out)[:10]
    out.unlink()


def test_merge_with_activation_matching_records_it(server, models):
    _merge_to_done(server, {"model_a": "alpha.safetensors", "model_b": "beta.safetensors", "parts": ["te"],
                            "matching": "activations", "activation_samples": 1,
                            "output_name": f"api_act_{server.kind}"})
    from lib_rebasin.io.checkpoint import open_checkpoint

    out = models / f"api_act_{server.kind}.safetensors"
    with open_checkpoint(out) as ck:
        recipe = json.loads(ck.metadata["lib_rebasin"])["recipe"]
    assert (recipe["matching"], recipe["activation_samples"]) == ("activations", 1)
    out.unlink()


def test_merge_with_repair_records_it(server, models):
    job = _merge_to_done(server, {"model_a": "alpha.safetensors", "model_b": "beta.safetensors",
                                  "method": "weighted_sum", "parts": ["unet"], "repair": True,
                                  "activation_samples": 1, "output_name": f"api_repair_{server.kind}"},
                         limit_s=300)  # three UNets' forward passes on top of the merge
    assert job["request"]["repair"] is True
    from lib_rebasin.io.checkpoint import open_checkpoint

    out = models / f"api_repair_{server.kind}.safetensors"
    with open_checkpoint(out) as ck:
        recipe = json.loads(ck.metadata["lib_rebasin"])["recipe"]
    assert (recipe["repair"], recipe["activation_samples"]) == (True, 1)
    out.unlink()


# -- the host's switches ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["standalone", "webui"])
def test_api_auth_requires_credentials_like_the_host(kind, models, tmp_path_factory):
    start = _standalone if kind == "standalone" else _standin
    srv = start(models, tmp_path_factory, "--api", "--api-auth", "alice:s3cret,bob:hunter2")
    try:
        paths = ["/rebasin/v1/checkpoints"] + (["/sdapi/v1/sd-models"] if kind == "webui" else [])
        for path in paths:  # ours answers exactly like the host's own /sdapi/v1 route
            status, body = srv.request("GET", path)
            assert status == 401, (path, status, body)
            assert srv.request("GET", path, user=("alice", "wrong"))[0] == 401
            assert srv.request("GET", path, user=("mallory", "s3cret"))[0] == 401
            assert srv.request("GET", path, user=("bob", "hunter2"))[0] == 200
        before = _fingerprint(models)
        status, _ = srv.post_json("/rebasin/v1/merge", ATTACK)
        assert status == 401
        assert _fingerprint(models) == before
        status, body = srv.post_json("/rebasin/v1/merge", {"model_a": "alpha.safetensors",
                                                           "model_b": "alpha.safetensors"}, user=("alice", "s3cret"))
        assert status == 400 and "same file" in body["detail"]
    finally:
        srv.stop()


@pytest.mark.parametrize("kind,flags,present", [
    ("standalone", [], False), ("webui", [], False), ("webui", ["--nowebui"], True)])
def test_routes_exist_only_when_the_host_serves_its_api(kind, flags, present, models, tmp_path_factory):
    start = _standalone if kind == "standalone" else _standin
    srv = start(models, tmp_path_factory, *flags)
    try:
        before = _fingerprint(models)
        status, _ = srv.request("GET", "/rebasin/v1/checkpoints")
        assert (status == 200) is present, status
        status, _ = srv.post_json("/rebasin/v1/merge", {"model_a": "alpha.safetensors",
                                                        "model_b": "alpha.safetensors"})
        assert (status == 400) is present, status
        if not present:
            assert status in (404, 405)
        assert _fingerprint(models) == before
    finally:
        srv.stop()


# -- the standalone app's address ---------------------------------------------------------------------------------

def test_standalone_honours_gradio_server_port_and_name(standalone_api):
    """The module's standalone server got its port and name only from the environment (see `standalone_api`)."""
    assert "--port" not in standalone_api.proc.args
    assert standalone_api.request("GET", "/rebasin/v1/checkpoints")[0] == 200


def test_standalone_on_a_port_in_use_says_so_in_one_line(models):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "GRADIO_ANALYTICS_ENABLED": "False"}
        r = subprocess.run([sys.executable, "-m", "lib_rebasin.ui.standalone", "--models-dir", str(models),
                            "--port", str(port)], cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "already in use" in lines[0] and str(port) in lines[0], r.stderr
    env["GRADIO_SERVER_PORT"] = "seventy"
    r = subprocess.run([sys.executable, "-m", "lib_rebasin.ui.standalone", "--models-dir", str(models)],
                       cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "GRADIO_SERVER_PORT" in r.stderr


# -- a cancel at the commit ---------------------------------------------------------------------------------------

def test_cancel_once_the_output_is_committed_is_refused_and_the_job_ends_done(models, tmp_path):
    """The merge's thread is held right after its output got its final name (tests/paused_cli.py, stage "placed",
    running the standalone app): a cancel then is too late (409), and the job ends done with the file."""
    from model_cache import place

    folder = tmp_path / "models"
    folder.mkdir()
    for name in ("alpha.safetensors", "beta.safetensors"):
        place(models / name, folder / name)  # a hard link: the merge reads its inputs and writes a new file
    port = _free_port()
    log = tmp_path / "server.log"
    srv = Server([sys.executable, str(ROOT / "tests" / "paused_cli.py"), "placed", "1", "--", "ui", "--models-dir",
                  str(folder), "--port", str(port), "--api"], port, log, stdin=subprocess.PIPE)
    try:
        status, job = srv.post_json("/rebasin/v1/merge", {"model_a": "alpha.safetensors",
                                                          "model_b": "beta.safetensors", "method": "weighted_sum",
                                                          "parts": ["unet", "te"], "output_name": "o"})
        assert status == 202, job
        deadline = time.time() + 120
        while "PAUSED" not in log.read_text():
            assert time.time() < deadline and srv.proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.1)
        assert (folder / "o.safetensors").is_file()
        status, body = srv.post_json(f"/rebasin/v1/jobs/{job['job_id']}/cancel", {})
        assert status == 409, body
        assert body["detail"] == "Too late to cancel: o.safetensors is being saved; the merge ends done."
        assert body["job"]["status"] == "running"
        assert srv.proc.stdin is not None
        srv.proc.stdin.write(b"\n")
        srv.proc.stdin.flush()
        deadline = time.time() + 120
        while not job["finished"] and time.time() < deadline:
            time.sleep(0.2)
            job = srv.request("GET", f"/rebasin/v1/jobs/{job['job_id']}")[1]
        assert job["status"] == "done", job
        assert job["output_name"] == "o.safetensors" and job["status_line"].endswith("saved o.safetensors.")
        assert (folder / "o.safetensors").is_file()
        status, body = srv.post_json(f"/rebasin/v1/jobs/{job['job_id']}/cancel", {})
        assert status == 409 and body["detail"] == "Too late to cancel: the merge is done; o.safetensors was saved."
    finally:
        srv.stop()
