"""HTTP API for scripted merges, mounted on the host's FastAPI app (the WebUI's, or the standalone gradio app's).

    POST /rebasin/v1/merge           JSON MergeRequest fields -> 202 {"job_id", ...} or 400 {"detail": reason}
    GET  /rebasin/v1/jobs/{job_id}   progress, and when finished the output path and diagnostics
    POST /rebasin/v1/jobs/{job_id}/cancel
    POST /rebasin/v1/load            {"job_id"} or {"path"} -> makes a finished merge the active checkpoint
    GET  /rebasin/v1/checkpoints     the host's checkpoint list

A merge request takes `MergeRequest`'s fields, among them `method` (any of lib_rebasin/methods.py), its parameters
(`ties_density`, `ties_scale`, `dare_p`, `seed`), `align`, `blocks` (a preset name, 26 or 25 values as a string or a
list) and `bake_vae` (a VAE from the host's VAE list, or a checkpoint).

Request bodies are read as plain JSON (no pydantic models), so the routes work with the fastapi/pydantic pairs
of both gradio 3.41 and 4.x hosts.
"""

# no `from __future__ import annotations`: FastAPI must see the real `Request` class in the route signatures

from pathlib import Path
from typing import Any

from ..errors import RebasinError
from .service import MergeRequest, MergeService

PREFIX = "/rebasin/v1"


def register_api(app: Any, service: MergeService, prefix: str = PREFIX) -> None:
    from fastapi import Request
    from fastapi.responses import JSONResponse

    async def _body(request: Request) -> Any:
        try:
            return await request.json()
        except Exception:
            raise RebasinError("The request body must be valid JSON.") from None

    async def merge(request: Request):
        try:
            req = MergeRequest.from_dict(await _body(request))
            job = service.submit(req)
        except RebasinError as e:
            return JSONResponse({"detail": str(e)}, status_code=400)
        return JSONResponse(job.to_dict(), status_code=202)

    def get_job(job_id: str):
        job = service.jobs.get(job_id)
        if job is None:
            return JSONResponse({"detail": f"No merge job '{job_id}'."}, status_code=404)
        return JSONResponse(job.to_dict())

    def cancel_job(job_id: str):
        job = service.cancel(job_id)
        if job is None:
            return JSONResponse({"detail": f"No merge job '{job_id}'."}, status_code=404)
        return JSONResponse(job.to_dict())

    async def load(request: Request):
        try:
            body = await _body(request)
            if not isinstance(body, dict):
                raise RebasinError("The request body must be a JSON object with 'job_id' or 'path'.")
            if body.get("job_id"):
                job = service.jobs.get(str(body["job_id"]))
                if job is None or job.output is None:
                    raise RebasinError(f"Merge job '{body['job_id']}' has no saved result to load.")
                path = job.output
            elif body.get("path"):
                path = service.resolve(str(body["path"]), "Checkpoint").path
            else:
                raise RebasinError("Give 'job_id' of a finished merge or 'path' of a listed checkpoint.")
            title = service.host.load_checkpoint(Path(path))
        except RebasinError as e:
            return JSONResponse({"detail": str(e)}, status_code=400)
        except Exception as e:  # the host's own loader failed (missing config, out of memory, ...)
            return JSONResponse({"detail": f"The host could not load the model ({type(e).__name__}: {e})."},
                                status_code=500)
        return JSONResponse({"loaded": title, "path": str(path)})

    def checkpoints():
        return JSONResponse([{"title": e.title, "path": str(e.path)} for e in service.checkpoints()])

    app.add_api_route(f"{prefix}/merge", merge, methods=["POST"])
    app.add_api_route(f"{prefix}/jobs/{{job_id}}", get_job, methods=["GET"])
    app.add_api_route(f"{prefix}/jobs/{{job_id}}/cancel", cancel_job, methods=["POST"])
    app.add_api_route(f"{prefix}/load", load, methods=["POST"])
    app.add_api_route(f"{prefix}/checkpoints", checkpoints, methods=["GET"])
