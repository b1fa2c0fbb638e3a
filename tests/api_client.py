"""Clients of the HTTP API the tests share: requests straight into the WebUI stand-in's ASGI app (no server), and
plain HTTP to a standalone app served on a free port."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

JOB_TIMEOUT_S = 300


class AsgiClient:
    """Requests straight into the ASGI app (no server, no TestClient: its httpx pairing differs by version)."""

    def __init__(self, app):
        self.app = app

    def _go(self, method, path, **kw):
        import asyncio

        import httpx

        async def one():
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:7860") as c:
                return await c.request(method, path, **kw)

        return asyncio.run(one())

    def get(self, path):
        return self._go("GET", path)

    def post(self, path, json=None):
        return self._go("POST", path, json=json)

    def finished(self, job_id: str) -> dict[str, Any]:
        """The job once it has finished (or as it is after JOB_TIMEOUT_S)."""
        deadline = time.time() + JOB_TIMEOUT_S
        while True:
            job = self.get(f"/rebasin/v1/jobs/{job_id}").json()
            if job["finished"] or time.time() > deadline:
                return job
            time.sleep(0.2)


def webui_api() -> AsgiClient:
    """The extension's routes as the WebUI serves them: its app-started callback on a new FastAPI app (the stand-in
    `modules` must be importable: the `webui` fixture of test_webui_adapter.py)."""
    from fastapi import FastAPI
    from modules import script_callbacks

    app = FastAPI()
    script_callbacks.app_started_callback(None, app)  # --nowebui passes demo=None
    return AsgiClient(app)


def post(url: str, body: dict) -> tuple[int, dict]:
    """POST a JSON body: the status and the JSON answer (an error's too)."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def finished(api: str, job_id: str) -> dict[str, Any]:
    """The job once it has finished (or as it is after JOB_TIMEOUT_S), polled over HTTP."""
    deadline = time.time() + JOB_TIMEOUT_S
    while True:
        with urllib.request.urlopen(f"{api}/jobs/{job_id}", timeout=30) as r:
            job = json.loads(r.read())
        if job["finished"] or time.time() > deadline:
            return job
        time.sleep(0.2)


@contextmanager
def standalone_api(folder: Path) -> Iterator[str]:
    """The standalone app on `folder` with its API on (served only with --api), on a free port: the API's root URL."""
    from lib_rebasin.ui.standalone import launch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    blocks, _service, url = launch(folder, port=port, block=False, api=True)
    try:
        yield url.rstrip("/") + "/rebasin/v1"
    finally:
        blocks.close()
