"""Hashing a huge input shows progress and stays cancellable; a file that is no checkpoint is never hashed.

The huge inputs are sparse files (32 GB of holes, no disk used): a valid mini checkpoint that carries one
enormous extra tensor (it passes every header check, so the merge reaches hashing), and a file of nothing but
holes (refused from its header).
"""

from __future__ import annotations

import hashlib
import json
import struct
import threading
from pathlib import Path

import pytest
import torch
from model_cache import cached_checkpoint, place

import lib_rebasin.io.input_file as input_file
import lib_rebasin.recipe.resolve as resolve_mod
from lib_rebasin.errors import Cancelled, CheckpointReadError
from lib_rebasin.io.checkpoint import open_checkpoint
from lib_rebasin.io.safetensors_format import DTYPE_NAMES
from lib_rebasin.merge.run import merge_checkpoints
from lib_rebasin.options import MergeOptions
from lib_rebasin.progress import ProgressEvent
from lib_rebasin.recipe.parse import parse_recipe
from lib_rebasin.recipe.resolve import resolve_models

HOLES = 32 * 10**9


def with_holes(src: Path, path: Path) -> Path:
    """`src`'s tensors plus a 32 GB uint8 tensor that is all holes: a valid checkpoint, 32 GB to hash."""
    with open_checkpoint(src) as ck:
        tensors = {k: ck.get(k) for k in ck.keys()}
    header: dict[str, object] = {}
    offset = 0
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        header[k] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["zz_holes"] = {"dtype": "U8", "shape": [HOLES], "data_offsets": [offset, offset + HOLES]}
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for t in tensors.values():
            f.write(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        f.truncate(8 + len(blob) + offset + HOLES)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("hashing")
    a = cached_checkpoint(d / "a.safetensors", "tiny", seed=1, base_seed=0)
    b = cached_checkpoint(d / "b.safetensors", "tiny", seed=2, base_seed=0)
    huge = with_holes(b, d / "b_huge.safetensors")
    junk = d / "holes.safetensors"
    with open(junk, "wb") as f:
        f.truncate(HOLES)
    return {"dir": d, "a": a, "b": b, "huge": huge, "junk": junk}


def test_hashing_a_huge_input_reports_progress_and_stops_at_a_cancel(models: dict, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[ProgressEvent] = []
    read = _count_reads(monkeypatch)

    def hashing_b() -> list[ProgressEvent]:
        return [ev for ev in events if ev.stage == "hashing" and "b_huge" in ev.message and ev.message.endswith("%")]

    out = tmp_path / "m.safetensors"
    with pytest.raises(Cancelled) as e:
        # The cancel comes as soon as hashing B is seen going (its second progress event, one chunk in).
        merge_checkpoints(models["a"], models["huge"], out, MergeOptions(method="weighted_sum"),
                          progress=events.append, cancel=lambda: len(hashing_b()) >= 2)
    assert "\n" not in str(e.value) and "no file was written" in str(e.value)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    seen = hashing_b()
    # 0 %, then the second report (how far it got in that time depends on the machine's speed) and the cancel,
    # which the hashing thread saw at its next chunk: not the rest of the 32 GB.
    assert len(seen) == 2 and seen[0].message.endswith(": 0%")
    assert not _hash_threads() and sum(read) < HOLES // 8
    fractions = [ev.fraction for ev in events]
    assert fractions == sorted(fractions)


def test_a_file_of_holes_is_refused_from_its_header_before_any_hashing(models: dict, tmp_path: Path) -> None:
    events: list[ProgressEvent] = []
    with pytest.raises(CheckpointReadError, match="holes.safetensors") as e:
        merge_checkpoints(models["a"], models["junk"], tmp_path / "m.safetensors",
                          MergeOptions(method="weighted_sum"), progress=events.append)
    assert "\n" not in str(e.value)
    assert not [ev for ev in events if ev.stage == "hashing"]


def test_recipe_search_by_hash_never_hashes_a_file_that_is_no_checkpoint(models: dict, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    for name in ("a", "b"):
        place(models[name], folder / f"{name}.safetensors")
    (folder / "0_holes.safetensors").symlink_to(models["junk"])  # sorts first: searched first
    hashed: list[str] = []
    real = resolve_mod.file_sha256

    def spy(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        hashed.append(Path(path).name)
        return "0" * 64 if "holes" in Path(path).name else real(path, *args, **kwargs)  # (32 GB not read)

    monkeypatch.setattr(resolve_mod, "file_sha256", spy)
    want = hashlib.sha256(models["b"].read_bytes()).hexdigest()
    recipe = parse_recipe(f'[models]\na = "a.safetensors"\nb = {{ sha256 = "{want}" }}\n\n[[step]]\nname = "m"\n'
                          'method = "weighted_sum"\na = "a"\nb = "b"\n')
    found = resolve_models(recipe, folder)
    assert found["b"].name == "b.safetensors"
    assert "0_holes.safetensors" not in hashed and "b.safetensors" in hashed


def _count_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of every read of an input file from now on."""
    read: list[int] = []
    real = input_file.FileSource.read_into

    def counted(self: input_file.FileSource, offset: int, buf: memoryview) -> None:
        read.append(len(buf))
        real(self, offset, buf)

    monkeypatch.setattr(input_file.FileSource, "read_into", counted)
    return read


def _hash_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "lib_rebasin-hash"]


def test_inputs_hashed_at_once_give_each_file_its_own_sha256(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Several files hashed together: each remembers the sha256 of its own bytes (one file given twice is read
    once), progress comes on the calling thread only, in order, up to the total, and no thread is left."""
    monkeypatch.setattr(input_file, "_usable_cpus", lambda: 2)  # threads even on a one-CPU runner
    monkeypatch.setattr(input_file, "HASH_REPORT_BYTES", 1 << 20)
    paths = []
    for i, size in enumerate((5 << 20, 3 << 20, 7 << 20)):
        p = tmp_path / f"f{i}.bin"
        p.write_bytes(torch.randint(0, 256, (size,), generator=torch.Generator().manual_seed(i),
                                    dtype=torch.uint8).numpy().tobytes())
        paths.append(p)
    sources = [input_file.FileSource(p) for p in paths]
    sources.append(input_file.FileSource(paths[0]))  # the same file again
    read = _count_reads(monkeypatch)
    calls: list[tuple[int, int, int]] = []
    try:
        input_file.hash_sources(sources, lambda done, total: calls.append((threading.get_ident(), done, total)))
        total = sum(p.stat().st_size for p in paths)
        assert sum(read) == total  # every byte once, the repeated file not again
        assert {t for t, _, _ in calls} == {threading.get_ident()}
        assert [d for _, d, _ in calls] == sorted(d for _, d, _ in calls) and calls[-1][1:] == (total, total)
        assert not _hash_threads()
        read.clear()
        for src, p in zip(sources, [*paths, paths[0]], strict=True):
            assert src.sha256() == hashlib.sha256(p.read_bytes()).hexdigest()
        assert not read  # remembered
    finally:
        for src in sources:
            src.close()


def test_a_cancel_or_an_unreadable_file_stops_every_hashing_thread(models: dict, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A cancel on the calling thread stops the others at their next chunk (the 32 GB input is not read through),
    and an error of a file hashed on another thread is raised on the calling one; no thread is left."""
    monkeypatch.setattr(input_file, "_usable_cpus", lambda: 2)
    read = _count_reads(monkeypatch)
    a, huge = input_file.FileSource(models["a"]), input_file.FileSource(models["huge"])
    seen: list[int] = []

    def cancel_at_second(done: int, total: int) -> None:
        seen.append(done)
        if len(seen) >= 2:
            raise Cancelled("stopped")

    try:
        with pytest.raises(Cancelled):
            input_file.hash_sources([a, huge], cancel_at_second)
        assert not _hash_threads() and sum(read) < HOLES // 8
    finally:
        a.close()
        huge.close()

    real = input_file.FileSource.read_into

    def unreadable(self: input_file.FileSource, offset: int, buf: memoryview) -> None:
        if self.path.name == "b_copy.safetensors":
            raise CheckpointReadError("b_copy.safetensors: read error (Input/output error).")
        real(self, offset, buf)

    monkeypatch.setattr(input_file.FileSource, "read_into", unreadable)
    copies = []
    for name in ("a", "b"):  # new files (another inode): not hashed before in this process
        copies.append(tmp_path / f"{name}_copy.safetensors")
        copies[-1].write_bytes(models[name].read_bytes())
    a, b = (input_file.FileSource(p) for p in copies)
    try:
        with pytest.raises(CheckpointReadError, match=r"b_copy\.safetensors"):
            input_file.hash_sources([a, b])
        assert not _hash_threads() and b._sha256 is None
    finally:
        a.close()
        b.close()
