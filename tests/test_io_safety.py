"""Inputs that change during a merge, and writers that are killed: real processes, real signals, real files.

Every test runs the real CLI in a subprocess held at a known point (`paused_cli.py`), acts on it there (a signal,
a truncated, rewritten or renamed input) and then checks how the process ended and what is left in the folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from model_cache import place

from lib_rebasin.io.checkpoint import open_checkpoint
from lib_rebasin.io.output_file import check_output_path
from lib_rebasin.merge.run import merge_checkpoints, merge_in_memory
from lib_rebasin.options import MergeOptions

ROOT = Path(__file__).resolve().parent.parent
PAUSED = Path(__file__).resolve().parent / "paused_cli.py"
OUR_TEMP = re.compile(r"^\..+\.rebasin-[0-9a-f]{8}-\d+-\d+-[0-9a-f]{6}\.tmp$")

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="inspects the writer through /proc")


# Every merge here merges the UNet and the text encoder of inputs without a VAE (`models`).
PARTS = ("unet", "te")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny fp16 models without their VAE in place of the mini ones: what is tested is how a merge treats its
    files, not the spec, the precision or the parts (a test that damages an input copies, and each merge writes,
    about a quarter of the bytes of an fp32 tiny model with its VAE). The `tiny_models` seeds."""
    from model_cache import cached_checkpoint, cached_without_parts

    d = tmp_path_factory.mktemp("io_safety_models")
    full = {"a": cached_checkpoint(d / "full_a.safetensors", "tiny", seed=11, base_seed=1),
            "finetune": cached_checkpoint(d / "full_finetune.safetensors", "tiny", seed=12, base_seed=1),
            "independent": cached_checkpoint(d / "full_independent.safetensors", "tiny", seed=2)}
    return {name: cached_without_parts(d / f"{name}.safetensors", path) for name, path in full.items()}


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Paused:
    """The CLI in a subprocess, held at the `n`-th progress report of `stage` until `resume()`."""

    def __init__(self, stage: str, n: int, args: list[str], named_temp: bool = False) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        cmd = [sys.executable, str(PAUSED), stage, str(n)] + (["--named-temp"] if named_temp else []) + ["--", *args]
        # Ctrl-C as a user's terminal sends it, even where this run's own SIGINT is ignored (a shell's background
        # job ignores it, and a child inherits that).
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, cwd=ROOT, env=env, preexec_fn=_default_sigint)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # blocks until the process is held there (or has ended)
        if not line.startswith("PAUSED"):
            out, err = self.proc.communicate(timeout=60)
            raise AssertionError(f"never reached {stage} #{n}: rc {self.proc.returncode}\n{line}{out}\n{err}")

    def files_open_in(self, folder: Path) -> list[tuple[str, int]]:
        """(target, size) of every file the process holds open in `folder` (an unnamed one reads '#N (deleted)')."""
        out = []
        fds = f"/proc/{self.proc.pid}/fd"
        for fd in os.listdir(fds):
            try:
                target = os.readlink(f"{fds}/{fd}")
                size = os.stat(f"{fds}/{fd}").st_size
            except OSError:
                continue
            if target.startswith(str(folder) + "/"):
                out.append((target, size))
        return out

    def resume(self, timeout: float = 600) -> tuple[int, str, str]:
        out, err = self.proc.communicate("\n", timeout=timeout)
        return self.proc.returncode, out, err

    def signal(self, sig: int, timeout: float = 600) -> tuple[int, str, str]:
        self.proc.send_signal(sig)
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, err


@pytest.fixture
def inputs(tmp_path: Path, models: dict[str, Path]) -> dict[str, Path]:
    """The inputs in a folder of the test's own (hard links into the model cache: a test that damages one takes
    its own copy first, `_own_copy`), and an empty output folder. Renaming a link over another changes no bytes."""
    d = tmp_path / "in"
    d.mkdir()
    (tmp_path / "out").mkdir()
    return {"a": place(models["a"], d / "a.safetensors"),
            "b": place(models["finetune"], d / "b.safetensors"),
            "other": place(models["independent"], d / "other.safetensors"),
            "out": tmp_path / "out"}


def _own_copy(path: Path) -> Path:
    """`path` as a file of its own (not a link into the cache), before a test truncates or rewrites it."""
    copy = path.with_name(path.name + ".copy")
    shutil.copyfile(path, copy)
    os.replace(copy, path)  # the link goes; the cache's file keeps its bytes
    return path


def _merge_args(inputs: dict[str, Path], name: str = "o.safetensors", method: str = "weighted_sum") -> list[str]:
    return ["merge", str(inputs["a"]), str(inputs["b"]), "-o", str(inputs["out"] / name), "--method", method,
            "--parts", ",".join(PARTS), "--max-sweeps", "1", "-q"]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _merge_again(inputs: dict[str, Path]) -> None:
    """Another merge into the same folder (it must clear what a killed writer left there)."""
    merge_checkpoints(inputs["a"], inputs["b"], inputs["out"] / "next.safetensors",
                      MergeOptions(method="weighted_sum", parts=PARTS))


@pytest.mark.parametrize("named_temp", [False, True], ids=["unnamed", "named-fallback"])
def test_sigkill_while_writing_leaves_nothing_behind(inputs: dict[str, Path], named_temp: bool) -> None:
    run = Paused("writing", 40, _merge_args(inputs), named_temp=named_temp)
    held = run.files_open_in(inputs["out"])
    assert len(held) == 1 and held[0][1] > 8, held  # bytes of the output are being written
    visible = sorted(p.name for p in inputs["out"].iterdir())
    rc, _, _ = run.signal(signal.SIGKILL)
    assert rc == -signal.SIGKILL
    left = sorted(p.name for p in inputs["out"].iterdir())
    assert left == visible
    if named_temp:  # a filesystem without unnamed files: the killed writer's hidden name remains, for now
        assert len(left) == 1 and OUR_TEMP.match(left[0]), left
    else:  # the output never had a name: nothing is left, by construction
        assert left == []
    _merge_again(inputs)
    assert sorted(p.name for p in inputs["out"].iterdir()) == ["next.safetensors"]


def test_sigterm_while_writing_cancels_cleanly(inputs: dict[str, Path]) -> None:
    run = Paused("writing", 40, _merge_args(inputs), named_temp=True)  # a named temp file must be removed too
    assert run.files_open_in(inputs["out"])
    rc, out, err = run.signal(signal.SIGTERM)
    assert rc == 2
    assert err.splitlines() == ["error: Cancelled by the user; no file was written."]
    assert list(inputs["out"].iterdir()) == []


@pytest.mark.parametrize("stage, method", [("matching", "rebasin"), ("writing", "weighted_sum")])
def test_input_truncated_during_a_merge_is_one_line_not_a_crash(inputs: dict[str, Path], stage: str,
                                                                method: str) -> None:
    _own_copy(inputs["b"])
    run = Paused(stage, 5, _merge_args(inputs, method=method))
    os.truncate(inputs["b"], inputs["b"].stat().st_size // 3)
    rc, out, err = run.resume()
    assert rc == 2, (rc, err)  # not -SIGBUS
    assert err.splitlines() == [
        "error: Model B (b.safetensors) changed while it was being read; nothing was written."]
    assert list(inputs["out"].iterdir()) == []


def test_input_rewritten_in_place_during_writing_is_refused(inputs: dict[str, Path]) -> None:
    _own_copy(inputs["b"])
    run = Paused("writing", 40, _merge_args(inputs))
    size = inputs["b"].stat().st_size
    with open(inputs["b"], "r+b") as f:  # same size, different bytes near the end (tensors not read yet)
        f.seek(size - 4096)
        f.write(os.urandom(4096))
    rc, out, err = run.resume()
    assert rc == 2, (rc, err)
    assert err.splitlines() == [
        "error: Model B (b.safetensors) changed while it was being read; nothing was written."]
    assert list(inputs["out"].iterdir()) == []


def test_recorded_hash_is_of_the_bytes_merged_when_an_input_is_replaced_by_rename(inputs: dict[str, Path]) -> None:
    original_b = _sha256(inputs["b"])
    ref, _ = merge_in_memory(inputs["a"], inputs["b"], MergeOptions(method="weighted_sum", parts=PARTS))  # B's bytes
    run = Paused("hashing", 1, _merge_args(inputs))  # before any input is hashed or any tensor written
    os.replace(inputs["other"], inputs["b"])  # another model now has B's name
    rc, out, err = run.resume()
    assert rc == 0, err
    out_file = inputs["out"] / "o.safetensors"
    with open_checkpoint(out_file) as ck:
        recipe = json.loads(ck.metadata["sd_merge_recipe"])
        models = json.loads(ck.metadata["sd_merge_models"])
        same = all(bool((ck.get(k) == ref.get(k)).all()) for k in ref.keys())
    assert same  # the old B was merged (the open file) ...
    assert recipe["secondary_model_hash"] == original_b  # ... and its hash is the one recorded
    assert original_b in models and _sha256(inputs["b"]) not in models


TWO_STEPS = """
[recipe]
name = "b twice"
parts = ["te"]

[models]
a = "a.safetensors"
b = "b.safetensors"

[[step]]
name = "m1"
method = "weighted_sum"
a = "a"
b = "b"
alpha = 0.3

[[step]]
name = "final"
method = "add_difference"
a = "m1"
b = "b"
c = "a"
alpha = 0.5
"""


def test_a_recipe_merges_and_records_one_version_of_an_input_replaced_midway(inputs: dict[str, Path]) -> None:
    from lib_rebasin.recipe.parse import parse_recipe

    folder = inputs["a"].parent
    (folder / "r.toml").write_text(TWO_STEPS)
    original_b = _sha256(inputs["b"])
    # What the recipe gives from B's bytes, step by step in memory as run_recipe runs it (its last step's tensors
    # are those its file holds).
    first, final = parse_recipe(TWO_STEPS).steps
    m1, _ = merge_in_memory(inputs["a"], inputs["b"], first.options)
    ref, _ = merge_in_memory(m1, inputs["b"], final.options, c=inputs["a"])
    # Held in the first step; B is replaced before the second step reads it again.
    run = Paused("writing", 5, ["recipe", str(folder / "r.toml"), "-o", str(inputs["out"] / "o.safetensors"), "-q"])
    os.replace(inputs["other"], inputs["b"])
    rc, out, err = run.resume()
    assert rc == 0, err
    with open_checkpoint(inputs["out"] / "o.safetensors") as ck:
        same = all(bool((ck.get(k) == ref.get(k)).all()) for k in ref.keys())
        models = json.loads(ck.metadata["sd_merge_models"])
    assert same and original_b in models and _sha256(inputs["b"]) not in models


# -- the sweep of stale temp files ------------------------------------------------------------------------

def _python(code: str, *args: str, **kw: object) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, **kw)  # type: ignore[call-overload]


_MAKE_TEMP = """
import sys
from pathlib import Path
from lib_rebasin.io.tempfiles import temp_name
folder = Path(sys.argv[1])
(folder / temp_name(folder / "x.safetensors")).write_bytes(b"partial")
print("made", flush=True)
sys.stdin.readline()
"""


def test_sweep_removes_only_dead_writers_temp_files(tmp_path: Path) -> None:
    live = _python(_MAKE_TEMP, str(tmp_path))
    assert live.stdout is not None and live.stdout.readline() == "made\n"
    dead = _python(_MAKE_TEMP, str(tmp_path))
    dead.communicate("\n", timeout=60)  # its writer has exited
    names = {p.name for p in tmp_path.iterdir()}
    assert len(names) == 2
    live_name = next(n for n in names if f"-{live.pid}-" in n)
    # pid 1 is alive but is not the writer its start time names (a reused pid); another system's file is kept
    # until nobody has touched it for an hour; so is an earlier version's mkstemp name; others are never touched.
    host = live_name.split(".rebasin-")[1][:8]
    reused = tmp_path / f".y.safetensors.rebasin-{host}-1-999999999-abcdef.tmp"
    foreign = tmp_path / ".z.safetensors.rebasin-00000000-1-5-abcdef.tmp"
    legacy_old = tmp_path / ".w.safetensors.k2j3h4g5.tmp"
    legacy_new = tmp_path / ".v.safetensors.a1b2c3d4.tmp"
    unrelated = [tmp_path / ".keep", tmp_path / ".u.safetensors.tmp", tmp_path / "model.safetensors"]
    for p in [reused, foreign, legacy_old, legacy_new, *unrelated]:
        p.write_bytes(b"x")
    os.utime(legacy_old, (1, 1))
    check_output_path(tmp_path / "new.safetensors")  # what every write runs first
    assert {p.name for p in tmp_path.iterdir()} == {live_name, foreign.name, legacy_new.name,
                                                    *(p.name for p in unrelated)}
    os.utime(foreign, (1, 1))
    live.communicate("\n", timeout=60)
    check_output_path(tmp_path / "new.safetensors")
    assert {p.name for p in tmp_path.iterdir()} == {legacy_new.name, *(p.name for p in unrelated)}


def test_overwrite_replaces_the_file_and_leaves_nothing_else(inputs: dict[str, Path]) -> None:
    out = inputs["out"] / "o.safetensors"
    out.write_bytes(b"old")
    merge_checkpoints(inputs["a"], inputs["b"], out, MergeOptions(method="weighted_sum", parts=PARTS), overwrite=True)
    with open_checkpoint(out) as ck, open_checkpoint(inputs["a"]) as a:
        assert len(ck) == len(a) > 500  # the merged model, every key of A
    assert [p.name for p in inputs["out"].iterdir()] == ["o.safetensors"]
    assert out.stat().st_mode & 0o777 == 0o644


def test_named_fallback_writes_and_overwrites_leaving_only_the_output(inputs: dict[str, Path],
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from lib_rebasin.io import tempfiles

    monkeypatch.setattr(tempfiles, "USE_UNNAMED", False)  # what a filesystem without O_TMPFILE gets
    out = inputs["out"] / "o.safetensors"
    merge_checkpoints(inputs["a"], inputs["b"], out, MergeOptions(method="weighted_sum", parts=PARTS))
    first = out.read_bytes()
    merge_checkpoints(inputs["a"], inputs["other"], out, MergeOptions(method="weighted_sum", parts=PARTS),
                      overwrite=True)
    assert out.read_bytes() != first
    assert [p.name for p in inputs["out"].iterdir()] == ["o.safetensors"]
    assert out.stat().st_mode & 0o777 == 0o644


def test_temp_names_stay_within_the_advertised_extra_length(tmp_path: Path) -> None:
    from lib_rebasin.io.tempfiles import TEMP_NAME_EXTRA, temp_name

    final = tmp_path / "x.safetensors"
    name = temp_name(final)
    assert OUR_TEMP.match(name) and len(name) - len(final.name) <= TEMP_NAME_EXTRA


def test_stopping_the_standalone_app_cancels_its_running_merge(inputs: dict[str, Path]) -> None:
    """What Ctrl-C / SIGTERM of the standalone app runs (`stop_jobs`): the merge is cancelled, nothing written."""
    import time

    from lib_rebasin.ui.request import MergeRequest
    from lib_rebasin.ui.service import MergeService
    from lib_rebasin.ui.standalone import StandaloneHost, stop_jobs

    folder = inputs["a"].parent
    svc = MergeService(StandaloneHost(folder, devices=["cpu"]))
    job = svc.submit(MergeRequest(model_a="a.safetensors", model_b="other.safetensors", output_name="stopped",
                                  device="cpu", method="rebasin", parts=PARTS))
    while job.stage != "matching" and not job.finished_flag:  # a real state of the job, not a guessed delay
        time.sleep(0.01)
    assert stop_jobs(svc) == "Stopped: cancelled the merge into stopped.safetensors; nothing was written."
    assert job.status == "cancelled"
    assert sorted(p.name for p in folder.iterdir()) == ["a.safetensors", "b.safetensors", "other.safetensors"]
    assert stop_jobs(svc) == "Stopped: no merge was running."
