"""Checkpoint files: lazy reading of .safetensors / .ckpt / .pt, and atomic streaming writes of .safetensors.

Reading a safetensors file maps it into memory and hands out zero-copy tensor views per key, so a 2 GB checkpoint
costs nothing until a tensor is touched, and the operating system can drop pages again under memory pressure.
Pickled checkpoints are loaded with `torch.load(weights_only=True)`: a pickle that needs arbitrary code is refused,
never executed.

Keys are normalised on the way in (nested `state_dict`, the old text-encoder layout without `text_model.`), so the
rest of the library sees one canonical SD 1.x layout.
"""

from __future__ import annotations

import json
import mmap
import os
import pickle
import struct
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

from .errors import CheckpointReadError, OutputError

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
                 in_memory: bool = False, releaser: Callable[[], None] = lambda: None) -> None:
        self.path = path
        self.infos = infos
        self._get = getter
        self.metadata = metadata
        self._closer = closer
        self._releaser = releaser
        self.in_memory = in_memory

    def keys(self) -> list[str]:
        return list(self.infos)

    def __contains__(self, key: str) -> bool:
        return key in self.infos

    def __len__(self) -> int:
        return len(self.infos)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: v.shape for k, v in self.infos.items()}

    def get(self, key: str) -> torch.Tensor:
        """The tensor for `key` (a read-only view for safetensors; do not modify in place)."""
        return self._get(key)

    def close(self) -> None:
        self._closer()

    def release_pages(self) -> None:
        """Drop the file pages this process has read from its resident set (a memory-mapped file only).

        They stay in the operating system's page cache, so reading them again costs a page fault, not a disk
        read; views handed out earlier stay valid. Without this, every page ever read counts towards the
        process's resident memory until the file is unmapped.
        """
        self._releaser()

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


def _open_safetensors(p: Path) -> Checkpoint:
    size = p.stat().st_size
    with open(p, "rb") as f:
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

    fh = open(p, "rb")
    mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size else None

    def get(key: str) -> torch.Tensor:
        _, offset, numel = places[key]
        info = infos[key]
        if numel == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # read-only buffer: we never write to these views
            if offset % info.dtype.itemsize == 0:
                t = torch.frombuffer(mm, dtype=info.dtype, count=numel, offset=offset)
            else:  # misaligned data: copy once
                t = torch.frombuffer(bytearray(mm[offset:offset + numel * info.dtype.itemsize]), dtype=info.dtype)
        return t.view(info.shape)

    def close() -> None:
        # Views handed out keep the mapping alive through their storage; closing only drops our handle.
        fh.close()

    def release() -> None:
        # MADV_DONTNEED on a read-only shared file mapping only unmaps pages: the data is re-read from the page
        # cache on the next access. (Windows has no madvise; there the system trims the working set itself.)
        if mm is not None and hasattr(mmap, "MADV_DONTNEED"):
            mm.madvise(mmap.MADV_DONTNEED)

    return Checkpoint(p, infos, get, metadata, close, releaser=release)


def resident_file_bytes() -> int | None:
    """Bytes of file-backed (memory-mapped) pages in this process's resident set, where the system says."""
    try:
        with open("/proc/self/statm") as f:
            shared_pages = int(f.read().split()[2])
    except (OSError, ValueError, IndexError):
        return None
    return shared_pages * mmap.PAGESIZE


def release_mapped_pages(checkpoints: Iterable[Checkpoint], above: int) -> None:
    """Release the checkpoints' mapped pages once this process holds more than `above` bytes of them.

    Call it between units of work (a group's cost matrix, a written tensor): resident memory then stays near
    `above` plus one unit, whatever the size of the files. Where the resident size is unknown, always release.
    """
    resident = resident_file_bytes()
    if resident is None or resident > above:
        for c in checkpoints:
            c.release_pages()


def _open_pickle(p: Path) -> Checkpoint:
    try:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(p, map_location="cpu", weights_only=True)
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
    return Checkpoint(p, infos, tensors.__getitem__, {}, tensors.clear)


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
    try:
        fd, probe = tempfile.mkstemp(prefix=".rebasin-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
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
    goes to a temporary file in the same folder, which is renamed into place only after every
    byte is written and flushed; on any error (including cancellation raised from `produce`) it is deleted.
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
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
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
        _place(tmp, p, overwrite)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return p


def _header_bytes(header: Mapping[str, object], reserve: int) -> bytes:
    """The JSON header, space-padded (as the format allows) to a multiple of 8 plus `reserve` spare bytes."""
    blob = json.dumps(header, separators=(",", ":")).encode()
    return blob + b" " * (-len(blob) % 8 + reserve)


def _place(tmp: str, final: Path, overwrite: bool) -> None:
    os.chmod(tmp, 0o644)
    if overwrite:
        os.replace(tmp, final)
        return
    try:  # link() fails if the target appeared meanwhile: never clobber a file we were told not to
        os.link(tmp, final)
    except FileExistsError:
        raise OutputError(f"Output {final} already exists; choose another name or allow overwriting.") from None
    except OSError:  # filesystems without hard links
        if final.exists():
            raise OutputError(f"Output {final} already exists; choose another name or allow overwriting.") from None
        os.replace(tmp, final)
        return
    os.unlink(tmp)


def save_state_dict(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor],
                    metadata: Mapping[str, str] | None = None, overwrite: bool = False) -> Path:
    """Write an in-memory state dict (keeps each tensor's dtype)."""
    entries = [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    return write_safetensors(path, entries, tensors.__getitem__, metadata, overwrite)


_SHA256_CACHE: dict[tuple[str, int, int, int], str] = {}


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of the whole file, as the WebUI shows it (the short hash is its first 10 hex digits).

    Remembered per file identity (path, inode, size, modification time), so a recipe that pins its inputs and
    the merge that records them, or the same inputs merged again in the WebUI, read a 2 GB file once.
    """
    import hashlib

    st = os.stat(path)
    ident = (str(Path(path).resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    cached = _SHA256_CACHE.get(ident)
    if cached is not None:
        return cached
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    _SHA256_CACHE[ident] = digest = h.hexdigest()
    return digest
