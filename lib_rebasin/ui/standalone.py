"""The Re-Basin tab as its own app, for people without the WebUI (and for the browser tests).

    python -m lib_rebasin ui --models-dir DIR [--port N] [--host 127.0.0.1]

A "generate nothing" host: it lists *.safetensors / *.ckpt in DIR, saves merges there, and "Load merged model"
only records which checkpoint is active (there is no generator to load it into). The HTTP API is mounted too.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from ..errors import RebasinError
from ..signals import sigterm_as_interrupt
from .host import BaseHost, CheckpointEntry, scan_checkpoints, scan_vaes


class StandaloneHost(BaseHost):
    name = "standalone"

    def __init__(self, models_dir: str | os.PathLike[str], devices: list[str] | None = None) -> None:
        super().__init__()
        self.models_dir = Path(models_dir).expanduser().resolve()
        self.active: Path | None = None
        self.loads: list[Path] = []
        self._entries: list[CheckpointEntry] = scan_checkpoints(self.models_dir)
        self._devices = devices
        self._queue = threading.Lock()  # the "GPU queue": one job at a time

    def list_checkpoints(self) -> list[CheckpointEntry]:
        return list(self._entries)

    def refresh_checkpoints(self) -> None:
        self._entries = scan_checkpoints(self.models_dir)

    def output_dir(self) -> Path:
        return self.models_dir

    def load_checkpoint(self, path: Path) -> str:
        path = Path(path)
        if not path.is_file():
            raise RebasinError(f"{path.name} is not in {self.models_dir} any more; refresh the lists.")
        self.refresh_checkpoints()
        self.active = path
        self.loads.append(path)
        for e in self._entries:
            if e.path.resolve() == path.resolve():
                return e.title
        return path.name

    def run_job(self, job_id: str, work: Callable[[], None]) -> None:
        with self._queue:
            self._interrupted.clear()
            work()

    def list_vaes(self) -> list[CheckpointEntry]:
        """<models-dir>/VAE/**, and *.vae.* files among the checkpoints (the WebUI's own rule)."""
        return scan_vaes(self.models_dir / "VAE", self.models_dir)

    def device_choices(self) -> list[str]:
        return list(self._devices) if self._devices else super().device_choices()


def create_app(models_dir: str | os.PathLike[str], devices: list[str] | None = None) -> tuple[Any, Any, Any]:
    """(blocks, service, host) for the standalone app; the caller launches `blocks`."""
    from .service import MergeService
    from .tab import TAB_CSS, build_tab

    host = StandaloneHost(models_dir, devices)
    service = MergeService(host)
    ui = build_tab(host, service, title="Re-Basin", css=TAB_CSS)
    return ui.blocks, service, host


def launch(models_dir: str | os.PathLike[str], port: int = 7861, server_name: str = "127.0.0.1",
           block: bool = True) -> tuple[Any, Any, str]:
    """Start the app; returns (blocks, service, url). With block=False it returns once the server is up."""
    from .api import register_api
    from .tab import gradio_major

    blocks, service, _host = create_app(models_dir)
    if gradio_major() >= 4:
        blocks.queue(default_concurrency_limit=4)
    else:
        blocks.queue(concurrency_count=4)
    app, local_url, _ = blocks.launch(server_name=server_name, server_port=port, prevent_thread_lock=True,
                                      show_error=True, quiet=True)
    register_api(app, service)
    url = local_url or f"http://{server_name}:{port}/"
    print(f"Re-Basin standalone: {url} (models in {_host.models_dir})", flush=True)
    if block:
        try:
            while True:  # our own wait, not blocks.block_thread(): it swallows Ctrl-C and prints its own line
                time.sleep(0.5)
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (see `main`)
            print(stop_jobs(service), file=sys.stderr, flush=True)
        finally:
            blocks.close()
    return blocks, service, url


def stop_jobs(service: Any, timeout: float = 120.0) -> str:
    """Cancel the running merge (if any) and wait until it has cleaned up; one line saying what happened."""
    job = service.running()
    if job is None:
        return "Stopped: no merge was running."
    service.cancel(job.id)
    if not job.wait(timeout):
        return f"Stopped: the merge into {job.prepared.output.name} did not stop within {timeout:.0f}s; nothing " \
               "was written (its temporary file has no name, or is removed by the next merge into that folder)."
    if job.status == "done":
        return f"Stopped: the merge had just finished; saved {job.output.name if job.output else ''}."
    return f"Stopped: cancelled the merge into {job.prepared.output.name}; nothing was written."


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lib_rebasin ui", description="Run the Re-Basin merge tab as a local web app.")
    p.add_argument("--models-dir", required=True, help="folder with *.safetensors/*.ckpt; merges are saved here")
    p.add_argument("--port", type=int, default=7861, help="port to listen on (default 7861)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    folder = Path(args.models_dir).expanduser()
    if not folder.is_dir():
        print(f"error: --models-dir {folder} is not a folder", file=sys.stderr)
        return 2
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("error: the standalone UI needs gradio (pip install 'gradio>=3.41,<5')", file=sys.stderr)
        return 2
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    sigterm_as_interrupt()  # our own process: SIGTERM stops it like Ctrl-C (never done inside the WebUI)
    launch(folder, port=args.port, server_name=args.host, block=True)
    return 2  # only a signal ends the server: a non-zero exit, like the CLI's cancel


if __name__ == "__main__":
    raise SystemExit(main())
