"""Checkpoint files: lazy reading of .safetensors / .ckpt / .pt, and atomic streaming writes of .safetensors.

Reading a safetensors file parses its header and then reads each tensor, when asked for, with a positional read
into a fresh buffer (`FileSource`), so a 2 GB checkpoint costs nothing until a tensor is needed and memory is
only what the caller keeps. Not memory-mapped on purpose: a mapped file that is truncated or rewritten while it
is read kills the process with SIGBUS (and with it the whole WebUI); a read returns short instead, and every
read checks the open file against what was opened, so a changed input becomes an `InputChangedError`.
The sha256 recorded for an input is the hash of the open file (the same inode the tensors came from), so a file
replaced by rename during a merge cannot give the output the new file's hash.
Pickled checkpoints are loaded with `torch.load(weights_only=True)`: a pickle that needs arbitrary code is refused,
never executed.

Keys are normalised on the way in (nested `state_dict`, the old text-encoder layout without `text_model.`), so the
rest of the library sees one canonical SD 1.x layout.

Writing goes through a temporary file that a killed process cannot leave behind (see `tempfiles.py`).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import struct
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

from .errors import CheckpointReadError, InputChangedError, OutputError
from .tempfiles import open_temp_output, place_output, probe_writable, sweep_stale_temp_files

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
PRECISIONS: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

_OLD_TE = "cond_stage_model.transformer."
_NEW_TE = "cond_stage_model.transformer.text_model."


def canonical_key(key: str) -> str:
    """Map old text-encoder keys (without `text_model.`) onto the current layout."""
    if key.startswith(_OLD_TE) and not key.startswith(_NEW_TE):
        return _NEW_TE + key[len(_OLD_TE):]
    return key


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype


class Checkpoint:
    """A read-only, lazily loaded state dict. Use as a context manager or call close()."""

    def __init__(self, path: Path, infos: dict[str, TensorInfo], getter: Callable[[str], torch.Tensor],
                 metadata: dict[str, str], closer: Callable[[], None] = lambda: None,
                 in_memory: bool = False, source: "FileSource | None" = None) -> None:
        self.path = path
        self.infos = infos
        self._get = getter
        self.metadata = metadata
        self._closer = closer
        self.in_memory = in_memory
        self.source = source  # the open file the tensors come from (None: in memory)

    def keys(self) -> list[str]:
        return list(self.infos)

    def __contains__(self, key: str) -> bool:
        return key in self.infos

    def __len__(self) -> int:
        return len(self.infos)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: v.shape for k, v in self.infos.items()}

    def get(self, key: str) -> torch.Tensor:
        """The tensor for `key` (do not modify it in place: a pickled or in-memory checkpoint hands out its own).

        Raises InputChangedError if the file was truncated or modified since it was opened."""
        return self._get(key)

    def sha256(self) -> str | None:
        """sha256 of the bytes this checkpoint reads (the open file, not whatever its path names now); None in
        memory. Raises InputChangedError if the file was modified since it was opened."""
        return None if self.source is None else self.source.sha256()

    def verify_unchanged(self) -> None:
        """Raise InputChangedError if the file was modified since it was opened (no-op in memory)."""
        if self.source is not None:
            self.source.verify()

    def read_bytes(self, offset: int, n: int) -> bytes:
        """Up to `n` raw bytes of the open file at `offset` (b"" in memory)."""
        return b"" if self.source is None else self.source.read_bytes(offset, n)

    def close(self) -> None:
        self._closer()
        if self.source is not None:
            self.source.close()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def size_bytes(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0


def memory_checkpoint(tensors: dict[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                      name: str = "in-memory") -> Checkpoint:
    """A Checkpoint over tensors held in memory (a recipe's intermediate result)."""
    infos = {k: TensorInfo(tuple(v.shape), v.dtype) for k, v in tensors.items()}
    return Checkpoint(Path(f"<{name}>"), infos, tensors.__getitem__, dict(metadata or {}), tensors.clear,
                      in_memory=True)


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Open a .safetensors, .ckpt or .pt checkpoint for lazy reading."""
    p = Path(path)
    if not p.exists():
        raise CheckpointReadError(f"File not found: {p}")
    if p.is_dir():
        raise CheckpointReadError(f"{p} is a folder, not a checkpoint file.")
    if p.suffix.lower() == ".safetensors":
        return _open_safetensors(p)
    with open(p, "rb") as f:
        head = f.read(8)
    if p.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin") or head[:2] == b"PK" or head[:1] == b"\x80":
        return _open_pickle(p)
    # Unknown extension: sniff a safetensors header.
    if len(head) == 8 and 2 <= struct.unpack("<Q", head)[0] < 100_000_000:
        return _open_safetensors(p)
    raise CheckpointReadError(f"{p.name}: not a checkpoint (expected .safetensors, .ckpt or .pt).")


class FileSource:
    """An open input file read by positional reads, and the identity (size, modification time) it had when opened.

    Every read is checked: a short read (the file was truncated) or a changed size or modification time (it was
    rewritten in place) raises InputChangedError instead of handing out bytes of another version of the file. A
    file replaced by rename is not an error: this descriptor still reads, consistently, the version it opened.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = open(path, "rb")
        self.identity = _identity(os.fstat(self.file.fileno()))
        self._lock = threading.Lock()  # only for systems without pread (one shared file position)
        self._sha256: str | None = None

    @property
    def size(self) -> int:
        return self.identity[2]

    def verify(self) -> None:
        if _identity(os.fstat(self.file.fileno())) != self.identity:
            raise InputChangedError(self.path)

    def read_into(self, offset: int, buf: memoryview) -> None:
        """Fill `buf` with the file's bytes at `offset`; raise InputChangedError if the file no longer has them."""
        view = buf.cast("B") if buf.format != "B" else buf
        done = 0
        try:
            while done < len(view):
                n = self._read_at(offset + done, view[done:])
                if n == 0:  # end of file before the end of the data: truncated since it was opened
                    raise InputChangedError(self.path)
                done += n
        except OSError as e:
            raise CheckpointReadError(f"{self.path.name}: read error ({e.strerror or e}).") from None
        self.verify()

    def read_bytes(self, offset: int, n: int) -> bytes:
        n = max(0, min(n, self.size - offset))
        buf = bytearray(n)
        if n:
            self.read_into(offset, memoryview(buf))
        return bytes(buf)

    def sha256(self) -> str:
        """sha256 of the whole opened file (as the WebUI shows it), remembered per file version."""
        if self._sha256 is None:
            self._sha256 = _hash_open_file(self)
        self.verify()
        return self._sha256

    def close(self) -> None:
        self.file.close()

    if hasattr(os, "preadv"):
        def _read_at(self, offset: int, view: memoryview) -> int:
            return os.preadv(self.file.fileno(), [view], offset)  # no shared file position; releases the GIL
    else:  # Windows: no positional read
        def _read_at(self, offset: int, view: memoryview) -> int:
            with self._lock:
                self.file.seek(offset)
                return self.file.readinto(view) or 0


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    """What tells one version of a file from another: device, inode, size and modification time."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _open_safetensors(p: Path) -> Checkpoint:
    src = FileSource(p)
    try:
        return _read_safetensors(p, src)
    except BaseException:
        src.close()
        raise


def _read_safetensors(p: Path, src: FileSource) -> Checkpoint:
    size = src.size
    f = src.file
    raw = f.read(8)
    if len(raw) < 8:
        raise CheckpointReadError(f"{p.name}: file is empty or truncated (no safetensors header).")
    (n,) = struct.unpack("<Q", raw)
    if n < 2 or 8 + n > size:
        raise CheckpointReadError(f"{p.name}: not a valid safetensors file (header length {n}, file size "
                                  f"{size}); the file may be truncated or not a checkpoint.")
    try:
        header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointReadError(f"{p.name}: safetensors header is not valid JSON ({e}).") from None
    if not isinstance(header, dict):
        raise CheckpointReadError(f"{p.name}: safetensors header is not a JSON object.")
    metadata = {str(k): str(v) for k, v in (header.pop("__metadata__", None) or {}).items()}
    data_start = 8 + n
    infos: dict[str, TensorInfo] = {}
    places: dict[str, tuple[str, int, int]] = {}
    for key, entry in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointReadError(f"{p.name}: unsupported or malformed tensor entry '{key}'.") from None
        numel = 1
        for s in shape:
            numel *= s
        if end - begin != numel * dtype.itemsize or data_start + end > size or begin < 0:
            raise CheckpointReadError(f"{p.name}: tensor '{key}' lies outside the file; the file is truncated "
                                      f"({size} bytes, needs {data_start + end}).")
        ck = canonical_key(key)
        infos[ck] = TensorInfo(shape, dtype)
        places[ck] = (key, data_start + begin, numel)
    src.verify()  # the header just parsed belongs to the version whose identity was taken

    def get(key: str) -> torch.Tensor:
        _, offset, numel = places[key]
        info = infos[key]
        t = torch.empty(numel, dtype=info.dtype)
        if numel:  # into a fresh, aligned buffer (data misaligned in the file costs nothing extra)
            src.read_into(offset, memoryview(t.view(torch.uint8).numpy()))
        return t.view(info.shape)

    return Checkpoint(p, infos, get, metadata, source=src)


def _open_pickle(p: Path) -> Checkpoint:
    src = FileSource(p)
    try:
        return _load_pickle(p, src)
    except BaseException:
        src.close()
        raise


def _load_pickle(p: Path, src: FileSource) -> Checkpoint:
    try:
        # Read into memory, not memory-mapped (a mapped file that changes while it is read kills the process
        # with SIGBUS), from the descriptor that is hashed later, so the recorded hash is of these bytes.
        obj = torch.load(src.file, map_location="cpu", weights_only=True)
        src.verify()
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsupported object"
        raise CheckpointReadError(
            f"{p.name}: refused to load: this pickle needs code beyond plain tensors ({first[:160]}). It was not "
            "executed. If you trust its source, convert it to .safetensors with a trusted tool.") from None
    except (EOFError, zipfile.BadZipFile, struct.error) as e:
        raise CheckpointReadError(f"{p.name}: file is truncated or corrupt ({type(e).__name__}).") from None
    except RuntimeError as e:
        raise CheckpointReadError(f"{p.name}: cannot read checkpoint ({str(e).splitlines()[0][:200]}); the file "
                                  "may be truncated or not a PyTorch checkpoint.") from None
    while isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointReadError(f"{p.name}: does not contain a state dict (found {type(obj).__name__}).")
    tensors: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            tensors[canonical_key(str(k))] = v
    if not tensors:
        raise CheckpointReadError(f"{p.name}: contains no tensors.")
    infos = {k: TensorInfo(tuple(v.shape), v.dtype) for k, v in tensors.items()}
    return Checkpoint(p, infos, tensors.__getitem__, {}, tensors.clear, source=src)


# -- writing --------------------------------------------------------------------------------------------------

def check_output_path(path: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """Validate an output path before any work starts; returns it as a Path."""
    p = Path(path)
    if p.suffix.lower() != ".safetensors":
        raise OutputError(f"Output must be a .safetensors file, got '{p.name}'.")
    if p.exists() and not overwrite:
        raise OutputError(f"Output {p} already exists; choose another name or allow overwriting.")
    if p.exists() and p.is_dir():
        raise OutputError(f"Output {p} is a folder.")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"Output folder {parent} does not exist.")
    sweep_stale_temp_files(parent)  # what killed writers left here (before any space is counted)
    try:
        probe_writable(parent)
    except OSError as e:
        raise OutputError(f"Output folder {parent} is not writable ({e.strerror}).") from None
    return p


def write_safetensors(path: str | os.PathLike[str], entries: Iterable[tuple[str, tuple[int, ...], torch.dtype]],
                      produce: Callable[[str], torch.Tensor], metadata: Mapping[str, str] | None = None,
                      overwrite: bool = False,
                      finalize_metadata: Callable[[], Mapping[str, str]] | None = None) -> Path:
    """Stream tensors into `path` atomically.

    `entries` fixes the order, shapes and dtypes up front so the header can be written first; `produce(key)` is
    then called once per key and its result written straight to disk, so the whole output is never held in
    memory. `finalize_metadata`, if given, is called after the last tensor and its result replaces the metadata
    in the header (space for it is reserved up front), so values measured while writing can be stored. The data
    goes to a temporary file in the same folder (unnamed where the system allows: see `tempfiles.py`), which is
    put in place only after every byte is written and flushed; on any error (including cancellation raised from
    `produce`) it is deleted, and if the process is killed instead, nothing or a sweepable name is left.
    """
    p = check_output_path(path, overwrite)
    entries = list(entries)
    header: dict[str, object] = {"__metadata__": {str(k): str(v) for k, v in (metadata or {}).items()}}
    offset = 0
    for key, shape, dtype in entries:
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * dtype.itemsize
        header[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = _header_bytes(header, reserve=65536 if finalize_metadata else 0)
    fd, tmp = open_temp_output(p)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for key, shape, dtype in entries:
                t = produce(key)
                if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                    raise AssertionError(f"{key}: produced {tuple(t.shape)} {t.dtype}, declared {shape} {dtype}")
                t = t.detach().to("cpu").contiguous()
                if t.numel():
                    f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            if finalize_metadata is not None:
                header["__metadata__"] = {str(k): str(v) for k, v in finalize_metadata().items()}
                final = _header_bytes(header, 0)
                if len(final) > len(blob):
                    raise AssertionError(f"final metadata ({len(final)} bytes) exceeds the reserved header space")
                f.seek(8)
                f.write(final + b" " * (len(blob) - len(final)))
            f.flush()
            os.fsync(f.fileno())
            try:
                place_output(f.fileno(), tmp, p, overwrite)
            except FileExistsError:
                raise OutputError(f"Output {p} already exists; choose another name or allow overwriting.") from None
    except BaseException:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return p


def _header_bytes(header: Mapping[str, object], reserve: int) -> bytes:
    """The JSON header, space-padded (as the format allows) to a multiple of 8 plus `reserve` spare bytes."""
    blob = json.dumps(header, separators=(",", ":")).encode()
    return blob + b" " * (-len(blob) % 8 + reserve)


def save_state_dict(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor],
                    metadata: Mapping[str, str] | None = None, overwrite: bool = False) -> Path:
    """Write an in-memory state dict (keeps each tensor's dtype)."""
    entries = [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    return write_safetensors(path, entries, tensors.__getitem__, metadata, overwrite)


_SHA256_CACHE: dict[tuple[int, int, int, int], str] = {}


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of the whole file, as the WebUI shows it (the short hash is its first 10 hex digits).

    Remembered per file version (device, inode, size, modification time), so a recipe that pins its inputs and
    the merge that records them, or the same inputs merged again in the WebUI, read a 2 GB file once.
    """
    src = FileSource(Path(path))
    try:
        return _hash_open_file(src)
    finally:
        src.close()


def _hash_open_file(src: FileSource) -> str:
    cached = _SHA256_CACHE.get(src.identity)
    if cached is not None:
        return cached
    h = hashlib.sha256()
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    offset = 0
    while offset < src.size:
        n = min(len(buf), src.size - offset)
        src.read_into(offset, view[:n])  # raises if the file changes while it is hashed
        h.update(view[:n])
        offset += n
    _SHA256_CACHE[src.identity] = digest = h.hexdigest()
    return digest
