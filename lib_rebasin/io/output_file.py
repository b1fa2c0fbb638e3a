"""The output file: its path and free space checked before any work, and the atomic, streamed write of a
.safetensors file through a temporary file that a killed process cannot leave behind (see `io/tempfiles.py`)."""

from __future__ import annotations

import contextlib
import errno
import math
import os
import shutil
import struct
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import BinaryIO

import torch

from ..errors import OutputError
from ..messages import clipped
from .safetensors_format import DTYPE_NAMES, header_bytes
from .tempfiles import TEMP_NAME_EXTRA, open_temp_output, place_output, probe_writable, sweep_stale_temp_files


def check_output_path(path: str | bytes | os.PathLike[str] | os.PathLike[bytes], overwrite: bool = False) -> Path:
    """Validate an output path before any work starts; returns it as a Path (a bytes path decoded as the file
    system does)."""
    text = os.fspath(path)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if "\0" in text:
        raise OutputError(f"The output path {text!r} contains a NUL byte; no file can have that name.")
    p = Path(text)
    if p.suffix.lower() != ".safetensors":
        raise OutputError(f"Output must be a .safetensors file, got '{p.name}'.")
    parent = p.parent if str(p.parent) else Path(".")
    try:
        parent_ok = parent.is_dir()
    except OSError:
        parent_ok = False
    if not parent_ok:
        try:
            os.stat(parent)
            raise OutputError(f"Output folder {parent} is not a folder.")
        except OSError as e:
            reason = "is a symbolic link loop" if e.errno == errno.ELOOP else "does not exist"
            raise OutputError(f"Output folder {parent} {reason}.") from None
    try:
        name_max = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # not every system or file system says; 255 is the common limit
        name_max = 255
    size = len(os.fsencode(p.name))
    if size + TEMP_NAME_EXTRA > name_max:
        raise OutputError(f"Output name '{clipped(p.name, 60)}' is too long for {parent} ({size} bytes; names there "
                          f"are limited to {name_max} bytes and writing needs {TEMP_NAME_EXTRA} more for its "
                          f"temporary file); choose a name of at most {name_max - TEMP_NAME_EXTRA} bytes.")
    if os.path.islink(p):
        try:
            os.stat(p)
        except OSError as e:
            what = "a symbolic link loop" if e.errno == errno.ELOOP else f"a symbolic link to {os.readlink(p)}, " \
                "which does not exist"
            raise OutputError(f"Output {p} is {what}; remove the link or choose another name.") from None
    if p.is_dir():
        raise OutputError(f"Output {p} is a folder.")
    if p.exists() and not overwrite:
        raise OutputError(f"Output {p} already exists; choose another name or allow overwriting.")
    sweep_stale_temp_files(parent)  # what killed writers left here (before any space is counted)
    try:
        probe_writable(parent)
    except OSError as e:
        raise OutputError(f"Output folder {parent} is not writable ({e.strerror}).") from None
    return p


def check_free_space(path: Path, needed: int) -> None:
    """Refuse before any work when the output's folder has less free space than the output will take."""
    folder = path.parent if str(path.parent) else Path(".")
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return  # the system cannot say; writing will tell
    if needed > free:
        raise OutputError(f"Not enough free space in {folder.resolve()}: the output needs {format_bytes(needed)}, "
                          f"only {format_bytes(free)} is free; free some space or choose another folder.")


def format_bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


# The write errors that mean "the disk (or a quota, or a size limit) is full", not a bug.
FULL_DISK_ERRNOS = {errno.ENOSPC, errno.EFBIG} | ({errno.EDQUOT} if hasattr(errno, "EDQUOT") else set())


def output_bytes(entries: Iterable[tuple[str, tuple[int, ...], torch.dtype]], metadata_bytes: int = 0) -> int:
    """The size of the safetensors file `write_safetensors` makes from `entries` (its header estimated)."""
    data = header = 0
    for key, shape, dtype in entries:
        data += math.prod(shape) * dtype.itemsize
        header += len(key) + 80
    return 8 + header + metadata_bytes + 65536 + data


# Output bytes after which the kernel is asked to start writing them to disk (`EarlyWriteback`).
WRITEBACK_BYTES = 64 << 20


class EarlyWriteback:
    """A file written front to back that asks the kernel to start writing each WRITEBACK_BYTES to disk as soon as
    they are written, while the merge goes on, so that the fsync before the output is put in place waits for the
    last piece only, not for the whole file at disk speed. `posix_fadvise(DONTNEED)` on a range just written starts
    its write-back without waiting for it, and leaves its pages in the page cache (they are dirty when asked), so
    loading the new file right after still reads memory. Only advice: where the call does not exist (Windows) or
    fails, the file is written exactly the same."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.written = self.advised = 0

    def write(self, data: bytes | memoryview) -> None:
        self.f.write(data)
        self.written += memoryview(data).nbytes
        if self.written - self.advised >= WRITEBACK_BYTES and hasattr(os, "posix_fadvise"):
            self.f.flush()
            # Advice refused (a file system without it): the final fsync writes everything, as without it.
            with contextlib.suppress(OSError):
                os.posix_fadvise(self.f.fileno(), self.advised, self.written - self.advised, os.POSIX_FADV_DONTNEED)
            self.advised = self.written


def write_safetensors(path: str | os.PathLike[str], entries: Iterable[tuple[str, tuple[int, ...], torch.dtype]],
                      produce: Callable[..., torch.Tensor], metadata: Mapping[str, str] | None = None,
                      overwrite: bool = False,
                      finalize_metadata: Callable[[], Mapping[str, str]] | None = None,
                      streamed: bool = False) -> Path:
    """Stream tensors into `path` atomically.

    `entries` fixes the order, shapes and dtypes up front so the header can be written first; `produce(key)` is
    then called once per key and its result written straight to disk, so the whole output is never held in
    memory. `finalize_metadata`, if given, is called after the last tensor and its result replaces the metadata
    in the header (space for it is reserved up front), so values measured while writing can be stored. The data
    goes to a temporary file in the same folder (unnamed where the system allows: see `io/tempfiles.py`), which is
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
    blob = header_bytes(header, reserve=65536 if finalize_metadata else 0)
    fd, tmp = open_temp_output(p)
    try:
        with os.fdopen(fd, "wb") as f:
            out = EarlyWriteback(f)
            out.write(struct.pack("<Q", len(blob)))
            out.write(blob)
            sunk = [0]

            def sink(piece: torch.Tensor) -> None:
                out.write(piece.reshape(-1).view(torch.uint8).numpy().data)
                sunk[0] += piece.numel() * piece.element_size()

            for key, shape, dtype in entries:
                sunk[0] = 0
                t = produce(key, sink) if streamed else produce(key)
                if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                    raise AssertionError(f"{key}: produced {tuple(t.shape)} {t.dtype}, declared {shape} {dtype}")
                if sunk[0]:
                    if sunk[0] != t.numel() * t.element_size():
                        raise AssertionError(f"{key}: {sunk[0]} bytes handed to the sink, {t.nbytes} produced")
                    continue
                t = t.detach().to("cpu").contiguous()
                if t.numel():
                    out.write(t.reshape(-1).view(torch.uint8).numpy().data)
            if finalize_metadata is not None:
                header["__metadata__"] = {str(k): str(v) for k, v in finalize_metadata().items()}
                final = header_bytes(header, 0)
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


def save_state_dict(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor],
                    metadata: Mapping[str, str] | None = None, overwrite: bool = False) -> Path:
    """Write an in-memory state dict (keeps each tensor's dtype)."""
    entries = [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    return write_safetensors(path, entries, tensors.__getitem__, metadata, overwrite)
