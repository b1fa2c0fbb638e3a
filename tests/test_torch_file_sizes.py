"""A .ckpt / .pt that declares more than it can hold is refused from its index, before torch.load allocates it.

The hostile files are built here: a 4 MB zip bomb (one deflated record of zeros that inflates to 4 GiB), files
whose pickle claims 17 GiB, in both PyTorch formats. The refusals run in a child process whose peak RSS is
measured; legitimate files in both formats, also recompressed, still load.
"""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import pytest
import torch

from lib_rebasin.io.checkpoint import open_checkpoint
from lib_rebasin.errors import CheckpointReadError

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30


class _Storage:
    def __init__(self, key: str, numel: int) -> None:
        self.key, self.numel = key, numel


class _Tensor:
    """Pickles as torch.save pickles a float32 tensor over a storage (nothing is allocated)."""

    def __init__(self, storage: _Storage) -> None:
        self.storage = storage

    def __reduce__(self) -> tuple:
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, 0, (self.storage.numel,), (1,), False, collections.OrderedDict()))


def _pickle(storages: dict[str, int], legacy: bool = False) -> bytes:
    """A state dict pickle declaring float32 storages {key: numel}, as torch.save writes it."""
    class Pickler(pickle.Pickler):
        def persistent_id(self, obj: object) -> object:
            if isinstance(obj, _Storage):
                pid = ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel)
                return pid + (None,) if legacy else pid
            return None

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump({"state_dict": {f"w{k}": _Tensor(_Storage(k, n)) for k, n in storages.items()}})
    return buf.getvalue()


def _zip(path: Path, records: list[tuple[str, bytes, int, int]]) -> Path:
    """A zip of (name, raw bytes as stored, method, inflated size) records, written by hand so that a deflated
    record can declare 4 GiB without 4 GiB passing through a compressor (its CRC is not what readers check
    before inflating, so a deflated one's is left 0). Zip64 sizes throughout, as torch writes large files."""
    out = io.BytesIO()
    central = []
    for name, data, method, size in records:
        crc = zlib.crc32(data) if method == zipfile.ZIP_STORED else 0
        offset = out.tell()
        extra = struct.pack("<HHQQ", 1, 16, size, len(data))
        header = struct.pack("<IHHHHHIIIHH", 0x04034B50, 45, 0, method, 0, 0x21, crc, 0xFFFFFFFF, 0xFFFFFFFF,
                             len(name), len(extra))
        out.write(header + name.encode() + extra + data)
        cextra = struct.pack("<HHQQQ", 1, 24, size, len(data), offset)
        central.append(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45, 0, method, 0, 0x21, crc, 0xFFFFFFFF,
                                   0xFFFFFFFF, len(name), len(cextra), 0, 0, 0, 0, 0xFFFFFFFF)
                       + name.encode() + cextra)
    start = out.tell()
    out.write(b"".join(central))
    size_cd = out.tell() - start
    out.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(records), len(records), size_cd, start, 0))
    path.write_bytes(out.getvalue())
    return path


def _deflated_zeros(n_mib: int) -> bytes:
    """A raw deflate stream of `n_mib` MiB of zeros, from one compressed MiB repeated (a full flush resets the
    compressor, so every MiB compresses to the same bytes)."""
    zeros = bytes(2**20)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
    return block * n_mib + c.flush(zlib.Z_FINISH)


def _torch_records(pkl: bytes) -> list[tuple[str, bytes, int, int]]:
    return [("bomb/data.pkl", pkl, 0, len(pkl)), ("bomb/byteorder", b"little", 0, 6), ("bomb/version", b"3\n", 0, 2)]


def zip_bomb(path: Path, declared_numel: int) -> Path:
    """One deflated record of zeros inflating to 4 GiB, its pickle declaring `declared_numel` floats."""
    data = _deflated_zeros(4096)
    return _zip(path, _torch_records(_pickle({"0": declared_numel}))
                + [("bomb/data/0", data, zipfile.ZIP_DEFLATED, 4 * GiB)])


def zip_claiming(path: Path, numel: int) -> Path:
    """A torch zip whose pickle claims `numel` floats, with a tiny stored record."""
    return _zip(path, _torch_records(_pickle({"0": numel})) + [("bomb/data/0", bytes(16), 0, 16)])


def legacy_claiming(path: Path, numel: int) -> Path:
    """torch < 1.6's format: magic number, protocol, system info, the main pickle, the storage keys, raw data."""
    head = b"".join(pickle.dumps(x, protocol=2) for x in (0x1950A86A20F9469CFC6C, 1001,
                                                          {"protocol_version": 1001, "little_endian": True}))
    path.write_bytes(head + _pickle({"0": numel}, legacy=True) + pickle.dumps(["0"], protocol=2)
                     + struct.pack("<q", 4) + bytes(16))
    return path


CHILD = """
import json, resource, sys, time
from lib_rebasin.io.checkpoint import open_checkpoint
from lib_rebasin.errors import RebasinError
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
try:
    open_checkpoint(sys.argv[1]).close()
    message = None
except RebasinError as e:
    message = str(e)
print(json.dumps({"message": message, "seconds": time.perf_counter() - start,
                  "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "before_kb": before}))
"""


def refuse_in_child(path: Path) -> dict:
    """Open `path` in a fresh process; its message, time and peak RSS (an address-space limit keeps a reader
    that does allocate what the file declares from taking the machine with it)."""
    def limit() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (3 * GiB, 3 * GiB))

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", CHILD, str(path)], env=env, capture_output=True, text=True,
                       timeout=600, preexec_fn=limit)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.parametrize("case, words", [
    ("bomb", ("inflate to 4.3 GB", "zip bomb")),
    ("bomb_small_declared", ("bomb/data/0 holds 4,294,967,296 bytes", "declares 16")),
    ("claims_17_gib", ("declares 18.3 GB of tensors", "SD 1.x")),
    ("legacy_claims_17_gib", ("declares 18.3 GB of tensors", "SD 1.x")),
])
def test_a_ckpt_that_declares_too_much_is_refused_from_its_index(tmp_path: Path, case: str,
                                                                 words: tuple[str, ...]) -> None:
    make = {"bomb": lambda p: zip_bomb(p, GiB), "bomb_small_declared": lambda p: zip_bomb(p, 4),
            "claims_17_gib": lambda p: zip_claiming(p, 17 * GiB // 4),
            "legacy_claims_17_gib": lambda p: legacy_claiming(p, 17 * GiB // 4)}[case]
    path = make(tmp_path / f"{case}.ckpt")
    assert path.stat().st_size < 5 * 10**6
    got = refuse_in_child(path)
    message = got["message"]
    assert message is not None and "\n" not in message and message.startswith(f"{path.name}: refused to load")
    for w in words:
        assert w in message, (w, message)
    # Nothing the file declares was allocated: the refusal costs what reading an index costs.
    assert got["peak_kb"] - got["before_kb"] < 256 * 1024, got


def test_a_legacy_ckpt_that_declares_more_than_the_file_is_refused(tmp_path: Path) -> None:
    path = legacy_claiming(tmp_path / "legacy.ckpt", GiB // 4)
    with pytest.raises(CheckpointReadError, match=r"declares 1\.1 GB of tensors but the file holds only"):
        open_checkpoint(path)


def test_a_pickle_that_inflates_beyond_an_index_is_refused(tmp_path: Path) -> None:
    data = _deflated_zeros(64)  # data.pkl itself as the bomb
    path = _zip(tmp_path / "pkl_bomb.ckpt", [("bomb/data.pkl", data, zipfile.ZIP_DEFLATED, 64 * 2**20)])
    with pytest.raises(CheckpointReadError, match="its pickle takes 67.1 MB, far more than a checkpoint's index"):
        open_checkpoint(path)


def test_a_stored_record_larger_than_the_file_is_refused(tmp_path: Path) -> None:
    """8 GiB declared alike by the pickle and the zip directory (within an SD checkpoint's bound), in a tiny file."""
    path = _zip(tmp_path / "short.ckpt", _torch_records(_pickle({"0": 2 * GiB}))
                + [("bomb/data/0", bytes(16), zipfile.ZIP_STORED, 8 * GiB)])
    with pytest.raises(CheckpointReadError, match="the record bomb/data/0 claims 8,589,934,592 bytes that the"):
        open_checkpoint(path)


def test_records_that_differ_only_in_case_are_refused(tmp_path: Path) -> None:
    pkl = _pickle({"0": 4})
    path = _zip(tmp_path / "twice.ckpt", _torch_records(pkl) + [("bomb/data/0", bytes(16), 0, 16),
                                                                ("bomb/DATA/0", bytes(16), 0, 16)])
    with pytest.raises(CheckpointReadError, match="holds 'bomb/DATA/0' twice"):
        open_checkpoint(path)


@pytest.mark.parametrize("form", ["zip", "legacy", "deflated"])
def test_real_checkpoints_in_every_form_still_load(tmp_path: Path, form: str) -> None:
    sd = {"a": torch.randn(3, 4), "b": torch.zeros(5, dtype=torch.float16), "i": torch.arange(4)}
    if form != "legacy":  # dtypes the legacy format cannot load back (in torch itself)
        sd.update({"f8": torch.ones(3, dtype=torch.float8_e4m3fn), "u16": torch.ones(2, dtype=torch.uint16)})
    sd["view"] = sd["a"].view(-1)[2:5]
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": sd, "global_step": 3}, path, _use_new_zipfile_serialization=form != "legacy")
    if form == "deflated":  # another tool re-zipped it with compression: still what torch.save declared
        with zipfile.ZipFile(path) as src:
            records = [(i.filename, src.read(i)) for i in src.infolist()]
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
            for name, data in records:
                z.writestr(name, data)
    with open_checkpoint(path) as ck:
        assert set(ck.keys()) == set(sd) and all(torch.equal(ck.get(k).view(torch.uint8), sd[k].view(torch.uint8))
                                                  for k in sd)
