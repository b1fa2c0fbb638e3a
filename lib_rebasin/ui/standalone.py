"""The Re-Basin tab as its own app, for people without the WebUI (and for the browser tests).

    python -m lib_rebasin ui --models-dir DIR [--port N] [--host 127.0.0.1] [--api [--api-auth user:pass]]
                             [--allowed-hosts NAME[,*.DOMAIN]]

A "generate nothing" host: it lists *.safetensors / *.ckpt in DIR, saves merges there, and "Load merged model"
only records which checkpoint is active (there is no generator to load it into). The HTTP API is mounted only with
--api, like the WebUI's; --api-auth protects it the way the WebUI's --api-auth does. The port and address default
to gradio's own GRADIO_SERVER_PORT / GRADIO_SERVER_NAME when they are set. Every route, the tab's included, answers
only to the host names of `ApiPolicy.host_allowed` (DNS rebinding): --allowed-hosts or REBASIN_ALLOWED_HOSTS add one.
"""

from __future__ import annotations

import argparse
import errno
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import RebasinError
from ..signals import sigterm_as_interrupt
from .api_policy import ALLOWED_HOSTS_ENV, ApiPolicy, parse_api_auth
from .host import BaseHost, CheckpointEntry, scan_checkpoints, scan_vaes

# VAE files live in <models-dir>/VAE (the standalone app's stand-in for the WebUI's models/VAE): never checkpoints.
VAE_FOLDER = "VAE"

DEFAULT_PORT = 7861
ALLOW_HINT = f"--allowed-hosts or the {ALLOWED_HOSTS_ENV} environment variable (comma-separated; *.domain for a proxy)"


class StandaloneHost(BaseHost):
    name = "standalone"

    def __init__(self, models_dir: str | os.PathLike[str], devices: list[str] | None = None) -> None:
        super().__init__()
        self.models_dir = Path(models_dir).expanduser().resolve()
        self.active: Path | None = None
        self.loads: list[Path] = []
        self._entries: list[CheckpointEntry] = scan_checkpoints(self.models_dir, skip=(VAE_FOLDER,))
        self._devices = devices
        self._queue = threading.Lock()  # the "GPU queue": one job at a time
        self._hashes: dict[Path, tuple[int, int, str]] = {}  # path -> (size, mtime_ns, sha256) of merged files

    def list_checkpoints(self) -> list[CheckpointEntry]:
        out = []
        for e in self._entries:
            known = self._hashes.get(e.path.resolve())
            try:
                st = e.path.stat()
                fresh = known is not None and known[:2] == (st.st_size, st.st_mtime_ns)
            except OSError:
                fresh = False
            out.append(CheckpointEntry(e.title, e.path, known[2]) if fresh and known else e)
        return out

    def remember_hashes(self, paths: list[Path]) -> None:
        from ..io.input_file import file_sha256  # inputs were hashed during the merge: remembered, not re-read

        for p in paths:
            st = Path(p).stat()
            self._hashes[Path(p).resolve()] = (st.st_size, st.st_mtime_ns, file_sha256(p))

    def refresh_checkpoints(self) -> None:
        self._entries = scan_checkpoints(self.models_dir, skip=(VAE_FOLDER,))

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
        return scan_vaes(self.models_dir / VAE_FOLDER, self.models_dir)

    def device_choices(self) -> list[str]:
        return list(self._devices) if self._devices else super().device_choices()


def create_app(models_dir: str | os.PathLike[str], devices: list[str] | None = None) -> tuple[Any, Any, Any]:
    """(blocks, service, host) for the standalone app; the caller launches `blocks`."""
    from .service import MergeService
    from .tab import build_tab
    from .tab.rendering import tab_css

    host = StandaloneHost(models_dir, devices)
    service = MergeService(host)
    ui = build_tab(host, service, title="Re-Basin", css=tab_css())
    return ui.blocks, service, host


def launch(models_dir: str | os.PathLike[str], port: int = DEFAULT_PORT, server_name: str = "127.0.0.1",
           block: bool = True, api: bool = False, api_auth: str | None = None,
           allowed_hosts: str | None = None) -> tuple[Any, Any, str]:
    """Start the app; returns (blocks, service, url). With block=False it returns once the server is up.
    The HTTP API is mounted only with `api` (the WebUI's --api), behind `api_auth` when given. Every route answers
    only to the names ApiPolicy allows, `allowed_hosts` (and REBASIN_ALLOWED_HOSTS) among them."""
    from .api import guard_hosts, register_api
    from .tab.compat import gradio_major

    policy = ApiPolicy.from_flags(api_auth, listen=server_name, allowed_hosts=allowed_hosts, allow_hint=ALLOW_HINT)
    check_port_free(server_name, port)
    blocks, service, _host = create_app(models_dir)
    if gradio_major() >= 4:
        blocks.queue(default_concurrency_limit=4)
    else:
        blocks.queue(concurrency_count=4)
    app, local_url, _ = blocks.launch(server_name=server_name, server_port=port, prevent_thread_lock=True,
                                      show_error=True, quiet=True)
    guard_hosts(app, policy)
    if api:
        register_api(app, service, policy)
    url = local_url or f"http://{server_name}:{port}/"
    ready = f"Re-Basin standalone: {url} (models in {_host.models_dir})" + (", HTTP API on" if api else "")
    if not block:
        print(ready, flush=True)
        return blocks, service, url
    try:
        # The ready line is printed inside the try: a signal that arrives as soon as it is read must still stop
        # the server cleanly (gradio 3's server thread would otherwise keep the process alive).
        print(ready, flush=True)
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
        if job.committed:  # too late to cancel, but the app is going: the file may or may not have its name yet
            return f"Stopped: {job.prepared.output.name} was still being saved after {timeout:.0f}s; check " \
                   "whether it is in the folder."
        return f"Stopped: the merge into {job.prepared.output.name} did not stop within {timeout:.0f}s; nothing " \
               "was written (its temporary file has no name, or is removed by the next merge into that folder)."
    if job.status == "done":
        return f"Stopped: the merge had just finished; saved {job.output.name if job.output else ''}."
    return f"Stopped: cancelled the merge into {job.prepared.output.name}; nothing was written."
def check_port_free(server_name: str, port: int) -> None:
    """One line instead of gradio's traceback when the port is taken (gradio would also print a stack)."""
    try:
        infos = socket.getaddrinfo(server_name, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise RebasinError(f"Cannot listen on {server_name}: {e.strerror}; pass --host 127.0.0.1.") from None
    family, kind, proto, _name, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is not "in use"
        try:
            s.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise RebasinError(f"Port {port} on {server_name} is already in use (another WebUI or Re-Basin "
                                   f"app?); pass --port N or set GRADIO_SERVER_PORT.") from None
            raise RebasinError(f"Cannot listen on {server_name}:{port}: {e.strerror}.") from None


def _env_port() -> int:
    raw = os.environ.get("GRADIO_SERVER_PORT", "").strip()
    if not raw:
        return DEFAULT_PORT
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise RebasinError(f"GRADIO_SERVER_PORT={raw[:20]!r} is not a port number (1-65535).")
    return int(raw)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lib_rebasin ui", description="Run the Re-Basin merge tab as a local web app.")
    p.add_argument("--models-dir", required=True, help="folder with *.safetensors/*.ckpt; merges are saved here")
    p.add_argument("--port", type=int, default=None,
                   help=f"port to listen on (default $GRADIO_SERVER_PORT, else {DEFAULT_PORT})")
    p.add_argument("--host", default=None, help="address to listen on (default $GRADIO_SERVER_NAME, else 127.0.0.1)")
    p.add_argument("--api", action="store_true", help="also serve the HTTP API under /rebasin/v1 (off by default)")
    p.add_argument("--api-auth", default=None, metavar="USER:PASS[,USER2:PASS2]",
                   help="with --api: require HTTP Basic credentials, like the WebUI's --api-auth")
    p.add_argument("--allowed-hosts", default=None, metavar="NAME[,*.DOMAIN]",
                   help="host names to answer to besides localhost and the --host address, e.g. a tunnel's or a "
                        f"cloud proxy's (*.proxy.example for all its names); also ${ALLOWED_HOSTS_ENV}")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    folder = Path(args.models_dir).expanduser()
    if not folder.is_dir():
        print(f"error: --models-dir {folder} is not a folder", file=sys.stderr)
        return 2
    if args.api_auth and not args.api:
        print("error: --api-auth protects the HTTP API; add --api to serve it", file=sys.stderr)
        return 2
    try:
        port = _env_port()  # checked even with --port: gradio itself parses it at import and would crash
        port = args.port if args.port is not None else port
        host = args.host or os.environ.get("GRADIO_SERVER_NAME", "").strip() or "127.0.0.1"
        parse_api_auth(args.api_auth)
    except RebasinError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        import gradio  # noqa: F401
    except ImportError:
        print('error: the standalone UI needs gradio: pip install -e ".[ui]" (see README)', file=sys.stderr)
        return 2
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    sigterm_as_interrupt()  # our own process: SIGTERM stops it like Ctrl-C (never done inside the WebUI)
    try:
        launch(folder, port=port, server_name=host, block=True, api=args.api, api_auth=args.api_auth,
               allowed_hosts=args.allowed_hosts)
    except RebasinError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 2  # only a signal ends the server: a non-zero exit, like the CLI's cancel


if __name__ == "__main__":
    raise SystemExit(main())
