"""HTTP API for scripted merges, mounted on the host's FastAPI app (the WebUI's, or the standalone gradio app's).

    POST /rebasin/v1/merge           JSON MergeRequest fields -> 202 {"job_id", ...}
    POST /rebasin/v1/sweep           the same, with "alpha" a list and "output_name" a template with {alpha}:
                                     one file per value, B matched onto A once (ui/sweep_job.py) -> 202 the job
    GET  /rebasin/v1/jobs/{job_id}   progress, and when finished the output and diagnostics
    POST /rebasin/v1/jobs/{job_id}/cancel   -> the job; 409 once its output is committed (too late: it ends done)
    POST /rebasin/v1/load            {"job_id"} or {"path"} -> makes a finished merge the active checkpoint
    POST /rebasin/v1/merge-load      the /merge body -> 202 job ("kind": "load"): merged in memory and loaded into
                                     the host's generator without a file (the WebUI only; 400 elsewhere)
    GET  /rebasin/v1/loaded          {"unsaved": the unsaved merge loaded now (label, title, save_as), or null}
    POST /rebasin/v1/save-loaded     {"output_name"?, "overwrite"?} -> writes the loaded unsaved merge (the bytes
                                     /merge writes), which then is the loaded checkpoint
    POST /rebasin/v1/compare         the /merge body plus "axis" (alpha | method | blocks), "values" and "generation"
                                     (txt2img settings): a labelled grid, one picture per candidate with one seed
                                     (ui/compare.py; the WebUI only) -> 202 job ("kind": "compare"); when done its
                                     "grid" (the saved file) and "candidates" (value, label, infotext)
    GET  /rebasin/v1/jobs/{job_id}/grid   the compare grid's picture
    POST /rebasin/v1/compare/load    {"index", "job_id"?} -> 202 a load job for that candidate (its match reused)
    POST /rebasin/v1/compare/save    {"index", "job_id"?, "output_name"?, "overwrite"?} -> 202 a merge job writing
                                     that candidate (the bytes /merge writes)
    GET  /rebasin/v1/checkpoints     the host's checkpoints: title, name and (when the host knows it) hash
    GET  /rebasin/v1/methods         every method, its flags and its options' declarations (type, default, bounds
                                     or choices for that method, label, help): the option table, for clients

Answers: 400 a refusal in plain words (same model twice, name taken, ...); 401 missing or wrong credentials
(only with --api-auth); 403 a `Host` this server does not answer to (DNS rebinding; checked first, on every route)
or a request from another site's page; 413 a body over a few KB; 415 a POST that is not application/json; 422 a
field whose value is refused: wrong type, out of range, or naming nothing (an unknown preset, model or VAE;
`"field"` names it). Only GET routes read; every route that changes something is a POST. Who may call is decided
by `ApiPolicy` (see api_policy.py).

A merge request takes `MergeRequest`'s fields: every option of the option table (lib_rebasin/options.py, listed
with their bounds by GET /methods), among them `method` and its parameters, plus `model_a`, `model_b`, `model_c`,
`output_name`, `overwrite`, `blocks` (a preset name, 26 or 25 values as a string or a list) and `bake_vae` (a VAE
from the host's VAE list, or a checkpoint).

Request bodies are read as plain JSON (no pydantic models), so the routes work with the fastapi/pydantic pairs
of both gradio 3.41 and 4.x hosts.
"""

# no `from __future__ import annotations`: FastAPI must see the real `Request` class in the route signatures

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import FieldError, RebasinError
from ..io.parsing import parse_json
from ..messages import shown
from .api_policy import ApiPolicy
from .compare import candidate_of, load_candidate, save_candidate, submit_compare
from .host import CheckpointEntry
from .request import MAX_TEXT, MergeRequest, field_of, method_listing
from .service import MergeService
from .sweep_job import submit_sweep

PREFIX = "/rebasin/v1"


class _Refused(Exception):
    def __init__(self, status: int, detail: str, field: str | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.field = status, detail, field



def object_body(body: Any, allowed: tuple[str, ...], shape: str, give: str) -> dict[str, Any]:
    """A route's JSON body: an object holding only the fields in `allowed` (else one line naming the first other)."""
    if not isinstance(body, dict):
        raise FieldError("body", f"The request body must be a JSON object {shape}.")
    unknown = sorted(set(body) - set(allowed), key=str)
    if unknown:
        raise FieldError(str(unknown[0])[:40], f"Unknown field {shown(unknown[0], 40)}; give {give}.")
    return body

def register_api(app: Any, service: MergeService, policy: ApiPolicy | None = None, prefix: str = PREFIX) -> None:
    from fastapi import Depends, HTTPException, Request
    from fastapi.responses import JSONResponse
    from fastapi.security import HTTPBasic, HTTPBasicCredentials

    policy = policy or ApiPolicy()

    def check_host(request: Request):
        """Before credentials, the body or anything else: the request must be addressed to this server."""
        host = request.headers.get("host")
        if not policy.host_allowed(host):
            raise HTTPException(status_code=403, detail=policy.host_refusal(host))

    dependencies = [Depends(check_host)]
    if policy.credentials:
        # The WebUI's own check for /sdapi/v1/* (modules/api/api.py, Api.auth), applied the same way.
        def auth(credentials: HTTPBasicCredentials = Depends(HTTPBasic())):
            if policy.check_credentials(credentials.username, credentials.password):
                return True
            raise HTTPException(status_code=401, detail="Incorrect username or password",
                                headers={"WWW-Authenticate": "Basic"})

        dependencies.append(Depends(auth))

    def answer(e: Exception) -> Any:
        if isinstance(e, _Refused):
            body = {"detail": e.detail}
            if e.field:
                body["field"] = e.field
            return JSONResponse(body, status_code=e.status)
        if isinstance(e, FieldError):
            return JSONResponse({"detail": str(e), "field": e.field}, status_code=422)
        return JSONResponse({"detail": str(e)}, status_code=400)

    def check_origin(request: Request) -> None:
        if not policy.origin_allowed(request.headers.get("origin"), request.headers.get("host")):
            raise _Refused(403, "Refused: this request comes from another site's page. Allow its origin with the "
                                "host's --cors-allow-origins if that is intended.")

    def refusal(request: Request) -> Any:
        """The answer refusing a request from another site's page, or None: the one check of the GET routes."""
        try:
            check_origin(request)
        except _Refused as e:
            return answer(e)
        return None

    async def json_body(request: Request) -> Any:
        check_origin(request)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise _Refused(415, "Send the request body as JSON with 'Content-Type: application/json'.")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > policy.max_body:
            raise _Refused(413, f"The request body is larger than {policy.max_body} bytes.")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > policy.max_body:
                raise _Refused(413, f"The request body is larger than {policy.max_body} bytes.")
        if not body.strip():
            return None
        return parse_json(bytes(body), lambda why: _Refused(400, f"The request body must be valid JSON; it is {why}."))

    async def submitted(request: Request, submit: Callable[[Any], Any]):
        """A route that starts a job: the JSON body handed to `submit`; 202 with the job, or the refusal."""
        try:
            job = submit(await json_body(request))
        except (_Refused, RebasinError) as e:
            return answer(e)
        return JSONResponse(job.to_dict(), status_code=202)

    async def merge(request: Request):
        return await submitted(request, lambda body: service.submit(MergeRequest.from_dict(body)))

    async def merge_load(request: Request):
        return await submitted(request, lambda body: service.submit_load(MergeRequest.from_dict(body)))

    async def sweep(request: Request):
        return await submitted(request, lambda body: submit_sweep(service, body))

    async def compare(request: Request):
        return await submitted(request, lambda body: submit_compare(service, body))

    def candidate_body(body: Any, extra: tuple[str, ...]) -> tuple[Any, dict[str, Any]]:
        allowed = ("index", "job_id", *extra)
        body = object_body(body, allowed, "with 'index' (and 'job_id')", ", ".join(allowed))
        for key in ("job_id", "output_name"):
            value = body.get(key)
            if value is not None and (not isinstance(value, str) or len(value) > MAX_TEXT):
                raise FieldError(key, f"Field '{key}' must be a string of at most {MAX_TEXT} characters.")
        if "overwrite" in body and not isinstance(body["overwrite"], bool):
            raise FieldError("overwrite", "Field 'overwrite' must be true or false.")
        return candidate_of(service, body.get("job_id"), body.get("index")), body

    async def compare_load(request: Request):
        def start(body: Any) -> Any:
            cand, _ = candidate_body(body, ())
            return load_candidate(service, cand)
        return await submitted(request, start)

    async def compare_save(request: Request):
        def start(body: Any) -> Any:
            cand, b = candidate_body(body, ("output_name", "overwrite"))
            return save_candidate(service, cand, b.get("output_name") or "", b.get("overwrite", False))
        return await submitted(request, start)

    def grid(job_id: str, request: Request):
        from fastapi.responses import FileResponse

        if (refused := refusal(request)) is not None:
            return refused
        job = service.jobs.get(job_id)
        path = getattr(job, "grid", None)
        if path is None or not Path(path).is_file():
            return JSONResponse({"detail": f"Job {shown(job_id, 60)} has no compare grid."}, status_code=404)
        return FileResponse(str(path))

    def loaded(request: Request):
        if (refused := refusal(request)) is not None:
            return refused
        cur = service.unsaved.current
        return JSONResponse({"unsaved": cur.to_dict() if cur is not None else None})

    async def save_loaded(request: Request):
        try:
            body = await json_body(request)
            body = {} if body is None else body
            body = object_body(body, ("output_name", "overwrite"), "('output_name', 'overwrite')",
                               "'output_name' and/or 'overwrite'")
            name, overwrite = body.get("output_name") or "", body.get("overwrite", False)
            if not isinstance(name, str) or len(name) > MAX_TEXT:
                raise FieldError("output_name", f"Field 'output_name' must be a string of at most {MAX_TEXT} "
                                                f"characters, got {shown(name, 60)}.")
            if not isinstance(overwrite, bool):
                raise FieldError("overwrite", f"Field 'overwrite' must be true or false, got {shown(overwrite, 40)}.")
            path, title = service.save_unsaved(name, overwrite)
        except (_Refused, RebasinError) as e:
            return answer(e)
        return JSONResponse({"output_name": path.name, "loaded": title})

    def get_job(job_id: str, request: Request):
        if (refused := refusal(request)) is not None:
            return refused
        job = service.jobs.get(job_id)
        if job is None:
            return JSONResponse({"detail": f"No merge job {shown(job_id, 60)}."}, status_code=404)
        return JSONResponse(job.to_dict())

    async def cancel_job(job_id: str, request: Request):
        try:
            await json_body(request)  # no fields; still JSON only, so a cross-site form cannot stop a merge
        except _Refused as e:
            return answer(e)
        job = service.cancel(job_id)
        if job is None:
            return JSONResponse({"detail": f"No merge job {shown(job_id, 60)}."}, status_code=404)
        too_late = job.too_late_to_cancel()
        if too_late:
            return JSONResponse({"detail": too_late, "job": job.to_dict()}, status_code=409)
        return JSONResponse(job.to_dict())

    def load_target(body: Any) -> Path:
        body = object_body(body, ("job_id", "path"), "with 'job_id' or 'path'", "'job_id' or 'path'")
        for key in ("job_id", "path"):
            value = body.get(key)
            if value is not None and (not isinstance(value, str) or len(value) > MAX_TEXT):
                raise FieldError(key, f"Field '{key}' must be a string of at most {MAX_TEXT} characters, got "
                                      f"{shown(value, 60)}.")
        if body.get("job_id"):
            job = service.jobs.get(body["job_id"])
            if job is None or job.output is None:
                raise RebasinError(f"Merge job {shown(body['job_id'], 60)} has no saved result to load.")
            return Path(job.output)
        if body.get("path"):
            with field_of("path"):
                return service.resolve(body["path"], "Checkpoint").path
        raise RebasinError("Give 'job_id' of a finished merge or 'path' of a listed checkpoint.")

    async def load(request: Request):
        try:
            path = load_target(await json_body(request))
            title = service.host.load_checkpoint(path)
        except (_Refused, RebasinError) as e:
            return answer(e)
        except Exception as e:  # the host's own loader failed (missing config, out of memory, ...)
            return JSONResponse({"detail": f"The host could not load the model ({type(e).__name__}: "
                                           f"{shown(str(e), 200)})."}, status_code=500)
        return JSONResponse({"loaded": title, "name": path.name})

    def checkpoints(request: Request):
        if (refused := refusal(request)) is not None:
            return refused
        return JSONResponse([entry_dict(e) for e in service.checkpoints()])

    def methods(request: Request):
        if (refused := refusal(request)) is not None:
            return refused
        return JSONResponse({"methods": method_listing()})

    for path, fn, method in ((f"{prefix}/merge", merge, "POST"), (f"{prefix}/sweep", sweep, "POST"),
                             (f"{prefix}/jobs/{{job_id}}", get_job, "GET"),
                             (f"{prefix}/jobs/{{job_id}}/cancel", cancel_job, "POST"),
                             (f"{prefix}/load", load, "POST"), (f"{prefix}/checkpoints", checkpoints, "GET"),
                             (f"{prefix}/methods", methods, "GET"),
                             (f"{prefix}/merge-load", merge_load, "POST"), (f"{prefix}/loaded", loaded, "GET"),
                             (f"{prefix}/save-loaded", save_loaded, "POST"),
                             (f"{prefix}/compare", compare, "POST"), (f"{prefix}/compare/load", compare_load, "POST"),
                             (f"{prefix}/compare/save", compare_save, "POST"),
                             (f"{prefix}/jobs/{{job_id}}/grid", grid, "GET")):
        app.add_api_route(path, fn, methods=[method], dependencies=list(dependencies))


def entry_dict(entry: CheckpointEntry) -> dict[str, Any]:
    """A checkpoint for API clients: how the host titles it, its file name inside the checkpoint folder, and its
    hashes when the host already knows them (like the WebUI's /sdapi/v1/sd-models); never an absolute path."""
    sha256 = entry.sha256
    return {"title": entry.title, "name": entry.name, "hash": sha256[:10] if sha256 else None, "sha256": sha256}


class HostGuard:
    """ASGI middleware: `ApiPolicy.host_allowed` for every route of an app (the standalone app's tab too, whose
    gradio routes can start a merge as well as the API can)."""

    def __init__(self, app: Any, policy: ApiPolicy) -> None:
        self.app, self.policy = app, policy

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            host = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"host"), None)
            if not self.policy.host_allowed(host):
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                body = json.dumps({"detail": self.policy.host_refusal(host)}).encode()
                await send({"type": "http.response.start", "status": 403,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def guard_hosts(app: Any, policy: ApiPolicy) -> None:
    """Put HostGuard in front of a running app (its middleware stack is rebuilt, as the WebUI does for CORS)."""
    from starlette.middleware import Middleware

    app.user_middleware.insert(0, Middleware(HostGuard, policy=policy))
    app.middleware_stack = app.build_middleware_stack()
