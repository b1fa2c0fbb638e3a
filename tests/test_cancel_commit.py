"""The commit decides how a stop ends: before it nothing is written and the stop says so; after it (the output has
its final name) the merge has succeeded, a stop changes nothing and the work ends done, naming the file.

The race is made exact: the CLI runs in a subprocess held right after `place_output` (or just before the last
cancel check) by `paused_cli.py`, and gets a real SIGINT / SIGTERM there; the service's jobs get their cancel from a
wrapper of `place_output` (or of the writer's final-metadata call). The HTTP API's side is in test_api_http.py.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

import pytest
from model_cache import place
from same_bytes import file_holds, held_checkpoint
from test_io_safety import Paused

from lib_rebasin.io import output_file
from lib_rebasin.merge import run as merge
from lib_rebasin.merge.held import merge_held
from lib_rebasin.merge.run import merge_in_memory
from lib_rebasin.options import MergeOptions
from lib_rebasin.ui.request import MergeRequest, RecipeRequest
from lib_rebasin.ui.service import MergeService
from lib_rebasin.ui.standalone import StandaloneHost, stop_jobs

RECIPE = """
[recipe]
name = "two steps"
precision = "fp16"

[models]
a = "a.safetensors"
b = "b.safetensors"
other = "other.safetensors"

[[step]]
name = "m1"
method = "weighted_sum"
a = "a"
b = "b"
alpha = 0.3

[[step]]
name = "final"
method = "weighted_sum"
a = "m1"
b = "other"
alpha = 0.4
"""


@pytest.fixture(scope="module")
def models(tiny_models_without_vae: dict[str, Path]) -> dict[str, Path]:
    """The tiny models without their VAE: what is tested is when a job's output is committed, not the spec nor
    what the output holds, and every output and reference merge is then half the bytes."""
    return tiny_models_without_vae


@pytest.fixture
def folder(tmp_path: Path, models: dict[str, Path]) -> Path:
    """A models folder of our own: the outputs are written next to the inputs, as in the WebUI."""
    folder = tmp_path / "models"
    folder.mkdir()
    for name, src in (("a", "a"), ("b", "finetune"), ("other", "independent")):
        place(models[src], folder / f"{name}.safetensors")
    (folder / "r.toml").write_text(RECIPE)
    return folder


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.suffix != ".toml")


INPUTS = ["a.safetensors", "b.safetensors", "other.safetensors"]


def _is_reference(output: Path, folder: Path, extra_metadata: dict[str, str] | None = None) -> bool:
    """`output` holds the same merge run without any stop, with the metadata the host adds (held in memory:
    `merge_held` is the file `merge_checkpoints` writes, test_held_merge.py)."""
    held = merge_held(folder / "a.safetensors", folder / "b.safetensors", MergeOptions(method="weighted_sum"),
                      extra_metadata=extra_metadata)
    return file_holds(output, held_checkpoint(held))


# -- the CLI: real signals at the commit ---------------------------------------------------------------------------

def _cli_args(folder: Path, kind: str) -> list[str]:
    if kind == "recipe":
        return ["recipe", str(folder / "r.toml"), "-o", str(folder / "o.safetensors"), "-q"]
    return ["merge", str(folder / "a.safetensors"), str(folder / "b.safetensors"), "-o",
            str(folder / "o.safetensors"), "--method", "weighted_sum", "-q"]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("kind", ["merge", "recipe"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_cli_signal_right_after_the_commit_reports_the_written_file(folder: Path, kind: str, sig: int) -> None:
    run = Paused("placed", 1, _cli_args(folder, kind))
    assert _names(folder) == sorted(INPUTS + ["o.safetensors"])  # the output has its final name
    run.proc.send_signal(sig)
    rc, out, err = run.resume()
    name = "Ctrl-C" if sig == signal.SIGINT else "SIGTERM"
    assert rc == 0, (rc, out, err)
    assert out.splitlines()[0] == f"Wrote {folder / 'o.safetensors'}"
    note = f"note: {name} came while o.safetensors was being saved, too late to stop it; the merge is complete."
    assert err.splitlines() == [note]
    assert _names(folder) == sorted(INPUTS + ["o.safetensors"])
    if kind == "merge":  # complete and exactly the merge's bytes (the same merge without a stop, held in memory)
        from same_bytes import same_bytes

        from lib_rebasin.io.checkpoint import open_checkpoint

        reference, _ = merge_in_memory(folder / "a.safetensors", folder / "b.safetensors",
                                       MergeOptions(method="weighted_sum"))
        with open_checkpoint(folder / "o.safetensors") as written:
            assert same_bytes(written, reference)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("kind", ["merge", "recipe"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_cli_signal_just_before_the_commit_leaves_nothing_and_says_so(folder: Path, kind: str, sig: int) -> None:
    run = Paused("finalize", 1, _cli_args(folder, kind), named_temp=True)  # the named temp file must go too
    rc, out, err = run.signal(sig)
    assert rc == 2, (rc, out, err)
    assert err.splitlines() == ["error: Cancelled by the user; no file was written."]
    assert "Wrote" not in out
    assert _names(folder) == INPUTS and not [p for p in folder.iterdir() if p.name.startswith(".")]


# -- the service: a cancel at the commit ---------------------------------------------------------------------------

def _submit(svc: MergeService, kind: str):
    if kind == "recipe":
        return svc.submit_recipe(RecipeRequest(RECIPE, output_name="o"))
    return svc.submit(MergeRequest(model_a="a.safetensors", model_b="b.safetensors", method="weighted_sum",
                                   output_name="o", device="cpu"))


def _around_place(monkeypatch: pytest.MonkeyPatch, before=None, after=None) -> None:
    real = output_file.place_output

    def place(*args, **kwargs):
        if before is not None:
            before()
        real(*args, **kwargs)
        if after is not None:
            after()

    monkeypatch.setattr(output_file, "place_output", place)


@pytest.mark.parametrize("kind", ["merge", "recipe"])
@pytest.mark.parametrize("how", ["cancel", "host interrupt"])
def test_service_cancel_right_after_the_commit_ends_done(folder: Path, monkeypatch: pytest.MonkeyPatch, kind: str,
                                                         how: str) -> None:
    host = StandaloneHost(folder, devices=["cpu"])
    svc = MergeService(host)
    answers = []

    def stop() -> None:
        if how == "cancel":
            answers.append(svc.cancel())
        else:  # the host's own Stop / Interrupt button (the WebUI's shared.state.interrupted)
            host.interrupt()

    _around_place(monkeypatch, after=stop)
    job = _submit(svc, kind)
    assert job.wait(300)
    assert job.status == "done", (job.status, job.message, job.error)
    assert job.output == folder / "o.safetensors" and job.output.is_file()
    assert job.status_line().startswith("Done in ") and job.status_line().endswith("saved o.safetensors.")
    if how == "cancel":
        assert answers == [job]
        assert job.too_late_to_cancel() == "Too late to cancel: the merge is done; o.safetensors was saved."
    assert _names(folder) == sorted(INPUTS + ["o.safetensors"])
    if kind == "merge":
        assert _is_reference(job.output, folder, {"lib_rebasin_host": host.name})


def test_service_cancel_after_the_last_check_but_before_the_file_is_placed_is_too_late(
        folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The merge's last cancel check has passed: the cancel is refused (not accepted and then ignored)."""
    svc = MergeService(StandaloneHost(folder, devices=["cpu"]))
    answers = []

    def cancel() -> None:
        answers.append(svc.cancel().message)

    _around_place(monkeypatch, before=cancel)
    job = _submit(svc, "merge")
    assert job.wait(300) and job.status == "done", (job.status, job.message)
    assert len(answers) == 1 and answers[0] != "Stopping..."  # the API's answer: test_api_http.py
    assert job.output is not None and job.output.is_file()


@pytest.mark.parametrize("kind", ["merge", "recipe"])
def test_service_cancel_just_before_the_commit_leaves_nothing(folder: Path, monkeypatch: pytest.MonkeyPatch,
                                                              kind: str) -> None:
    """The mirror image: every tensor is written, the file is not in place yet; the cancel wins, truthfully."""
    svc = MergeService(StandaloneHost(folder, devices=["cpu"]))
    real_write = merge.write_safetensors

    def write(*args, finalize_metadata, **kwargs):
        def finalize():
            assert svc.cancel() is not None
            return finalize_metadata()

        return real_write(*args, finalize_metadata=finalize, **kwargs)

    monkeypatch.setattr(merge, "write_safetensors", write)
    job = _submit(svc, kind)
    assert job.wait(300)
    assert job.status == "cancelled" and job.status_line() == "Stopped: no file was written."
    assert job.too_late_to_cancel() is None
    assert _names(folder) == INPUTS and not [p for p in folder.iterdir() if p.name.startswith(".")]


def test_stopping_the_app_while_the_file_is_being_saved_never_says_nothing_was_written(
        folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The standalone app's Ctrl-C gives up waiting on a job held after its commit: it must not claim "nothing"."""
    svc = MergeService(StandaloneHost(folder, devices=["cpu"]))
    placed, release = threading.Event(), threading.Event()

    def hold() -> None:
        placed.set()
        release.wait(60)

    _around_place(monkeypatch, after=hold)
    job = _submit(svc, "merge")
    assert placed.wait(300)
    try:
        line = stop_jobs(svc, timeout=0.2)
    finally:
        release.set()
    assert line == "Stopped: o.safetensors was still being saved after 0s; check whether it is in the folder."
    assert job.wait(60) and job.status == "done"
