"""The HTTP API answers only to host names it serves (DNS rebinding), and names the field of every refused value.

Real server processes (the standalone app and the WebUI stand-in, started as in test_api_http.py) and raw requests
through http.client, so each request carries exactly the `Host` and `Origin` a browser would send: after an
attacker's name is re-pointed at 127.0.0.1, its page is same-origin with itself and sends `attacker.example:PORT`
as both.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import sys
import time
from pathlib import Path

import pytest

from test_api_http import ATTACK, STANDIN_SERVER, Server, _fingerprint, _free_port

pytestmark = pytest.mark.ui

pytest.importorskip("gradio")


def raw(port: int, method: str, path: str, host: str, origin: str | None = None,
        body: dict | str | None = None) -> tuple[int, dict | str]:
    """One request to 127.0.0.1:port with this exact Host (and Origin), as a browser sends them."""
    headers = {"Host": host}
    if origin:
        headers["Origin"] = origin
    data = None
    if body is not None:
        data = body if isinstance(body, str) else json.dumps(body)
        headers["Content-Type"] = "application/json"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        status, payload = resp.status, resp.read()
    finally:
        conn.close()
    try:
        return status, json.loads(payload)
    except ValueError:
        return status, payload.decode(errors="replace")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from model_cache import cached_checkpoint

    d = tmp_path_factory.mktemp("Stable-diffusion")
    cached_checkpoint(d / "alpha.safetensors", "tiny", seed=1, base_seed=0)
    cached_checkpoint(d / "beta.safetensors", "tiny", seed=2, base_seed=0)
    cached_checkpoint(d / "victim.safetensors", "tiny", seed=3, base_seed=0)
    return d


def _start(kind: str, models: Path, tmp: Path, *flags: str, env: dict | None = None,
           settings: dict | None = None) -> Server:
    """A real server; `env` is added to its environment, `settings` is the WebUI's config.json."""
    port = _free_port()
    data = tmp / f"{kind}-{port}"
    data.mkdir()
    if settings is not None:
        (data / "config.json").write_text(json.dumps(settings))
    if kind == "standalone":
        cmd = [sys.executable, "-m", "lib_rebasin.ui.standalone", "--models-dir", str(models), "--port", str(port)]
    else:
        cmd = [sys.executable, str(STANDIN_SERVER), "--models-dir", str(models), "--data-dir", str(data), "--port",
               str(port)]
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        srv = Server([*cmd, *flags], port, data / "server.log")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    srv.kind = kind
    return srv


@pytest.fixture(scope="module", params=["standalone", "webui"])
def loopback(request, models, tmp_path_factory):
    """The API on, listening on 127.0.0.1 as both hosts do by default; nothing allowed beyond that."""
    srv = _start(request.param, models, tmp_path_factory.mktemp("srv"), "--api")
    yield srv
    srv.stop()


def _routes() -> list[tuple[str, str, dict | None]]:
    return [("GET", "/rebasin/v1/checkpoints", None), ("GET", "/rebasin/v1/jobs/x", None),
            ("POST", "/rebasin/v1/merge", ATTACK), ("POST", "/rebasin/v1/jobs/x/cancel", {}),
            ("POST", "/rebasin/v1/load", {"path": "victim.safetensors"})]


def _refused(status: int, body, hint: str = "REBASIN_ALLOWED_HOSTS") -> bool:
    return status == 403 and isinstance(body, dict) and hint in body["detail"] and "\n" not in body["detail"]


def test_a_rebound_name_is_refused_on_every_route_and_writes_nothing(loopback, models):
    before = _fingerprint(models)
    for host in (f"attacker.example:{loopback.port}", "attacker.example", f"127.0.0.1.attacker.example:{loopback.port}",
                 f"localhost.attacker.example:{loopback.port}"):
        for origin in (f"http://{host}", None):
            for method, path, body in _routes():
                status, answer = raw(loopback.port, method, path, host, origin, body)
                assert _refused(status, answer), (host, origin, method, path, status, answer)
    if loopback.kind == "standalone":  # the standalone app guards its tab's routes too: they can start a merge
        status, answer = raw(loopback.port, "GET", "/", f"attacker.example:{loopback.port}")
        assert _refused(status, answer, "--allowed-hosts"), (status, answer)
    time.sleep(1.0)  # a merge that had started would have written its temporary file by now
    assert _fingerprint(models) == before


def test_malformed_host_headers_are_refused(loopback):
    for host in ("", "127.0.0.1:x", "::1", "[::1", "a b", "localhost:1:2"):
        status, answer = raw(loopback.port, "GET", "/rebasin/v1/checkpoints", host)
        assert status in (400, 403), (host, status, answer)


def test_loopback_names_with_and_without_port_are_served(loopback):
    port = loopback.port
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", "127.0.0.1", f"[::1]:{port}",
                 f"LOCALHOST.:{port}"):
        status, answer = raw(port, "GET", "/rebasin/v1/checkpoints", host)
        assert status == 200 and {c["name"] for c in answer} >= {"alpha.safetensors"}, (host, status, answer)
    # a page of our own origin: the request is processed (and refused by validation, so nothing runs)
    same = {"model_a": "alpha.safetensors", "model_b": "alpha.safetensors"}
    status, answer = raw(port, "POST", "/rebasin/v1/merge", f"localhost:{port}", f"http://localhost:{port}", same)
    assert status == 400 and "same file" in answer["detail"], answer
    # another site's page sent to a loopback Host is still another site's page
    status, answer = raw(port, "POST", "/rebasin/v1/merge", f"localhost:{port}", "http://attacker.example", same)
    assert status == 403 and "another site" in answer["detail"], answer


def test_standalone_allows_names_by_flag_and_environment(models, tmp_path):
    srv = _start("standalone", models, tmp_path, "--api", "--allowed-hosts", "flag.example",
                 env={"REBASIN_ALLOWED_HOSTS": "*.proxy.example, tunnel.example"})
    try:
        for host in ("flag.example", "pod-7861.proxy.example", "a.b.proxy.example:443", "tunnel.example:8080"):
            status, answer = raw(srv.port, "GET", "/rebasin/v1/checkpoints", host)
            assert status == 200, (host, status, answer)
            status, answer = raw(srv.port, "GET", "/", host)  # the tab itself, through the proxy
            assert status == 200, (host, status)
        for host in ("proxy.example.attacker.example", "evilproxy.example", "attacker.example", "flag.example.evil"):
            status, answer = raw(srv.port, "GET", "/rebasin/v1/checkpoints", host)
            assert _refused(status, answer, "--allowed-hosts"), (host, status, answer)
        # a page served through the proxy is same-origin with it
        proxy = "pod-7861.proxy.example"
        status, answer = raw(srv.port, "POST", "/rebasin/v1/merge", proxy, f"https://{proxy}",
                             {"model_a": "alpha.safetensors", "model_b": "alpha.safetensors"})
        assert status == 400 and "same file" in answer["detail"], answer
    finally:
        srv.stop()


def test_webui_listen_accepts_the_machine_and_allowed_names_not_any(models, tmp_path):
    """--listen (0.0.0.0): the user chose LAN access. The machine's names and IP addresses are served, so are the
    names allowed by our flag (preload.py), the Settings option (config.json), the environment variable and the
    host's CORS origins; any other name is refused."""
    srv = _start("webui", models, tmp_path, "--api", "--listen", "--rebasin-allowed-hosts", "flag.example",
                 "--cors-allow-origins", "http://friend.example",
                 env={"REBASIN_ALLOWED_HOSTS": "*.envproxy.example"}, settings={"rebasin_allowed_hosts": "opt.example"})
    try:
        port = srv.port
        own = socket.gethostname()
        for host in (f"{own}:{port}", f"{own.split('.')[0]}.local:{port}", f"192.0.2.7:{port}", f"[fe80::1]:{port}",
                     f"localhost:{port}", "flag.example", f"opt.example:{port}", "x.envproxy.example",
                     f"friend.example:{port}"):
            status, answer = raw(port, "GET", "/rebasin/v1/checkpoints", host)
            assert status == 200, (host, status, answer)
        before = _fingerprint(models)
        for host in (f"attacker.example:{port}", f"{own}.attacker.example:{port}", "envproxy.example.evil"):
            for method, path, body in _routes():
                status, answer = raw(port, method, path, host, f"http://{host}", body)
                assert _refused(status, answer, "Settings > Re-Basin"), (host, path, status, answer)
                assert "--rebasin-allowed-hosts" in answer["detail"]
        time.sleep(1.0)
        assert _fingerprint(models) == before
    finally:
        srv.stop()


def test_share_and_ngrok_tunnels_allow_their_own_names():
    from lib_rebasin.ui.api_policy import ApiPolicy

    plain = ApiPolicy.from_flags()
    shared = ApiPolicy.from_flags(share=True, ngrok=True)
    for host in ("abcd1234.gradio.live", "x-y.ngrok-free.app"):
        assert not plain.host_allowed(host) and shared.host_allowed(host), host
    assert not shared.host_allowed("gradio.live.attacker.example")


# -- refused values name their field (422) ---------------------------------------------------------------------

PAIR = {"model_a": "alpha.safetensors", "model_b": "beta.safetensors"}
TWENTY_FIVE = ",".join(["0.5"] * 25)


@pytest.mark.parametrize("extra,field", [
    ({"method": "weighted_sum", "blocks": "-0.5," + TWENTY_FIVE}, "blocks"),
    ({"method": "rebasin", "blocks": [0.5] * 25 + [1.5]}, "blocks"),
    ({"blocks": "NaN," + TWENTY_FIVE}, "blocks"),
    ({"blocks": "0.5,0.5"}, "blocks"),
    ({"blocks": [0.5, 0.5, 0.5]}, "blocks"),
    ({"blocks": "NOPE"}, "blocks"),
    ({"method": "legacy", "blocks": "GRAD_V"}, "blocks"),
    ({"method": "add_difference", "model_c": "victim.safetensors", "blocks": "20," + TWENTY_FIVE}, "blocks"),
    ({"method": "weighted_sum", "align": True, "iterations": 3}, "iterations"),
    ({"model_a": "missing.safetensors"}, "model_a"),
    ({"output_name": "../outside"}, "output_name"),
    ({"bake_vae": "no-such-vae.safetensors"}, "bake_vae"),
])
def test_refused_values_are_422_naming_the_field(loopback, models, extra, field):
    before = _fingerprint(models)
    status, answer = raw(loopback.port, "POST", "/rebasin/v1/merge", f"127.0.0.1:{loopback.port}", None,
                         {**PAIR, **extra})
    assert status == 422 and answer.get("field") == field and "\n" not in answer["detail"], (status, answer)
    assert _fingerprint(models) == before


def test_nan_in_a_json_block_list_is_422_naming_blocks(loopback):
    body = json.dumps(PAIR)[:-1] + ', "blocks": [NaN' + ", 0.5" * 25 + "]}"  # Python's json reads NaN
    status, answer = raw(loopback.port, "POST", "/rebasin/v1/merge", f"127.0.0.1:{loopback.port}", None, body)
    assert status == 422 and answer["field"] == "blocks", answer


def test_load_of_an_unknown_checkpoint_is_422_naming_path(loopback):
    status, answer = raw(loopback.port, "POST", "/rebasin/v1/load", f"127.0.0.1:{loopback.port}", None,
                         {"path": "missing.safetensors"})
    assert status == 422 and answer["field"] == "path", answer
