"""A stand-in WebUI *server* for tests: the startup order of AUTOMATIC1111 1.10's webui.py, served by uvicorn.

    python webui.py --models-dir DIR --port N [--api] [--nowebui] [--api-auth u:p] [--cors-allow-origins O]
                    [--cors-allow-origins-regex R] [--data-dir DIR] [--listen] [--server-name NAME]
                    [--rebasin-allowed-hosts ...: the extension's own flags, from its preload.py]

Modeled on the host's files, not copied: webui.py (`webui()` builds the UI and launches gradio, drops gradio's
CORSMiddleware, then creates the API only with --api and calls the app_started callbacks; `api_only()` for
--nowebui builds a bare FastAPI app), modules/initialize_util.py (`configure_cors_middleware` from
--cors-allow-origins / --cors-allow-origins-regex) and modules/api/api.py (the `Api` class: HTTP Basic with
`compare_digest` on every /sdapi/v1 route when --api-auth is set; here one route, /sdapi/v1/sd-models).
The extension is loaded from scripts/rebasin_tab.py by file path, as the host loads extension scripts; its
preload.py adds its flags to the parser first (modules/shared_cmd_options.py, script_loading.preload_extensions), and
the settings in DATA_DIR/config.json are loaded before the scripts, as the host's opts.load does. The server listens
where the host would (initialize_util.gradio_server_name: --server-name, else 0.0.0.0 with --listen).
"""

import argparse
import importlib.util
import os
import sys
from pathlib import Path
from secrets import compare_digest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))


def parse_args(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--models-dir", required=True)
    p.add_argument("--data-dir", default=None, help="where config.json goes (default: the models folder's parent)")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--api", action="store_true")
    p.add_argument("--nowebui", action="store_true")
    p.add_argument("--api-auth", default=None)
    p.add_argument("--cors-allow-origins", default=None)
    p.add_argument("--cors-allow-origins-regex", default=None)
    p.add_argument("--listen", action="store_true")
    p.add_argument("--server-name", default=None)
    spec = importlib.util.spec_from_file_location("preload", ROOT / "preload.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.preload(p)
    return p.parse_args(argv)


def add_sdapi(app, cmd_opts):
    """The host's Api class, reduced to one route and its credentials check."""
    from fastapi import Depends
    from fastapi.exceptions import HTTPException
    from fastapi.security import HTTPBasic, HTTPBasicCredentials

    from modules import sd_models

    credentials = {}
    if cmd_opts.api_auth:
        for auth in cmd_opts.api_auth.split(","):
            user, password = auth.split(":")
            credentials[user] = password

    def check(creds: HTTPBasicCredentials = Depends(HTTPBasic())):
        if creds.username in credentials and compare_digest(creds.password, credentials[creds.username]):
            return True
        raise HTTPException(status_code=401, detail="Incorrect username or password",
                            headers={"WWW-Authenticate": "Basic"})

    def sd_models_route():
        return [{"title": i.title, "model_name": i.model_name, "hash": i.shorthash, "sha256": i.sha256,
                 "filename": i.filename} for i in sd_models.checkpoints_list.values()]

    deps = [Depends(check)] if cmd_opts.api_auth else []
    app.add_api_route("/sdapi/v1/sd-models", sd_models_route, methods=["GET"], dependencies=deps)


def configure_cors_middleware(app, cmd_opts):
    import starlette.middleware
    from starlette.middleware.cors import CORSMiddleware

    cors_options = {"allow_methods": ["*"], "allow_headers": ["*"], "allow_credentials": True}
    if cmd_opts.cors_allow_origins:
        cors_options["allow_origins"] = cmd_opts.cors_allow_origins.split(",")
    if cmd_opts.cors_allow_origins_regex:
        cors_options["allow_origin_regex"] = cmd_opts.cors_allow_origins_regex
    app.user_middleware.insert(0, starlette.middleware.Middleware(CORSMiddleware, **cors_options))


def main(argv=None):
    args = parse_args(argv)
    from modules import call_queue, script_callbacks, sd_models, shared

    for key, value in vars(args).items():
        setattr(shared.cmd_opts, key, value)
    sd_models.model_path = str(Path(args.models_dir).resolve())
    shared.config_filename = str(Path(args.data_dir or Path(args.models_dir).resolve().parent) / "config.json")
    if os.path.exists(shared.config_filename):
        import json

        with open(shared.config_filename, encoding="utf8") as f:
            shared.opts.data.update(json.load(f))
    server_name = args.server_name or ("0.0.0.0" if args.listen else "127.0.0.1")
    sd_models.list_models()
    shared.opts.onchange("sd_model_checkpoint",
                         call_queue.wrap_queued_call(lambda: sd_models.reload_model_weights()), call=False)
    spec = importlib.util.spec_from_file_location("rebasin_tab.py", ROOT / "scripts" / "rebasin_tab.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    script_callbacks.ui_settings_callback()

    import uvicorn

    if args.nowebui:  # webui.py api_only(): no gradio UI at all
        from fastapi import FastAPI

        app = FastAPI()
        configure_cors_middleware(app, shared.cmd_opts)
        add_sdapi(app, shared.cmd_opts)
        script_callbacks.app_started_callback(None, app)
        print(f"stand-in webui (API only) on http://127.0.0.1:{args.port}", flush=True)
        uvicorn.run(app, host=server_name, port=args.port, log_level="warning")
        return 0

    import gradio as gr

    # txt2img first, as the host builds it before the extensions' tabs: the components the compare grid reads
    # (modules/ui.py, ui_toprow.py, processing_scripts/seed.py and sampler.py), each through the after_component hook
    data_dir = Path(args.data_dir or Path(args.models_dir).resolve().parent)
    shared.opts.data.setdefault("outdir_txt2img_grids", str(data_dir / "outputs" / "txt2img-grids"))
    with gr.Blocks(analytics_enabled=False) as txt2img:
        for make, elem_id in ((lambda: gr.Textbox("a lighthouse", label="Prompt"), "txt2img_prompt"),
                              (lambda: gr.Textbox("", label="Negative prompt"), "txt2img_neg_prompt"),
                              (lambda: gr.Dropdown(["Euler a", "DPM++ 2M"], value="Euler a"), "txt2img_sampling"),
                              (lambda: gr.Slider(1, 150, step=1, value=4, label="Steps"), "txt2img_steps"),
                              (lambda: gr.Slider(64, 2048, step=8, value=64, label="Width"), "txt2img_width"),
                              (lambda: gr.Slider(64, 2048, step=8, value=64, label="Height"), "txt2img_height"),
                              (lambda: gr.Number(42, precision=0, label="Seed"), "txt2img_seed")):
            component = make()
            component.elem_id = elem_id
            script_callbacks.after_component_callback(component, elem_id=elem_id)
    tabs = script_callbacks.ui_tabs_callback()
    with gr.Blocks(analytics_enabled=False) as demo:
        dd = gr.Dropdown(choices=sd_models.checkpoint_tiles(), elem_id="setting_sd_model_checkpoint",
                         label="Stable Diffusion checkpoint")
        script_callbacks.after_component_callback(dd, elem_id="setting_sd_model_checkpoint",
                                                  label="Stable Diffusion checkpoint")
        with gr.Tabs(elem_id="tabs"):
            with gr.Tab("txt2img", id="txt2img", elem_id="tab_txt2img"):
                txt2img.render()
            for blocks, title, elem_id in tabs:
                with gr.Tab(title, id=elem_id, elem_id=f"tab_{elem_id}"):
                    blocks.render()
    demo.queue()
    app, _local_url, _ = demo.launch(server_name=server_name, server_port=args.port, prevent_thread_lock=True,
                                     quiet=True)
    # webui.py: gradio's permissive CORS middleware is removed, the host's own is configured in its place
    app.user_middleware = [x for x in app.user_middleware if x.cls.__name__ != "CORSMiddleware"]
    configure_cors_middleware(app, shared.cmd_opts)
    app.middleware_stack = None  # rebuilt with the new middleware on the next request
    if args.api:
        add_sdapi(app, shared.cmd_opts)
    script_callbacks.app_started_callback(demo, app)
    print(f"stand-in webui on http://127.0.0.1:{args.port}", flush=True)
    demo.block_thread()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    raise SystemExit(main())
