"""Checkpoint files: lazy reading of .safetensors / .ckpt / .pt, and atomic streaming writes of .safetensors.

Reading a safetensors file parses its header and then reads each tensor, when asked for, with a positional read
into a fresh buffer (`FileSource`), so a 2 GB checkpoint costs nothing until a tensor is needed and memory is
only what the caller keeps. Not memory-mapped on purpose: a mapped file that is truncated or rewritten while it
is read kills the process with SIGBUS (and with it the whole WebUI); a read returns short instead, and every
read checks the open file against what was opened, so a changed input becomes an `InputChangedError`.
The sha256 recorded for an input is the hash of the open file (the same inode the tensors came from), so a file
replaced by rename during a merge cannot give the output the new file's hash.
Pickled checkpoints are loaded with `torch.load(weights_only=True)`: a pickle that needs arbitrary code is refused,
never executed; what the load would allocate is read from the file's index first (`torch_file_sizes.py`).

Keys are normalised on the way in (nested `state_dict`, the old text-encoder layout without `text_model.`), so the
rest of the library sees one canonical SD 1.x layout.

Writing goes through a temporary file that a killed process cannot leave behind (see `tempfiles.py`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import pickle
import re
import shutil
import stat
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Mapping

import torch

from .errors import CheckpointReadError, InputChangedError, OutputError
from .parsing import parse_json
from .torch_file_sizes import check_sizes
from .tempfiles import TEMP_NAME_EXTRA, open_temp_output, place_output, probe_writable, sweep_stale_temp_files

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

    def sha256(self, progress: "HashProgress | None" = None) -> str | None:
        """sha256 of the bytes this checkpoint reads (the open file, not whatever its path names now); None in
        memory. Raises InputChangedError if the file was modified since it was opened. `progress(done, total)` is
        called while a file is hashed; what it raises (a cancel) stops the hashing."""
        return None if self.source is None else self.source.sha256(progress)

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
    p = Path(check_input_path(path))
    try:
        kind = _container(p)
        return _open_safetensors(p) if kind == "safetensors" else _open_pickle(p, kind)
    except OSError as e:
        raise CheckpointReadError(f"Cannot read {p}: {e.strerror or e}.") from None


def check_header(path: str | os.PathLike[str]) -> None:
    """What open_checkpoint refuses without reading tensor data (a safetensors header, a PyTorch file's index):
    CheckpointReadError. For deciding whether a file is worth reading whole (hashing it) at all."""
    p = Path(check_input_path(path))
    try:
        kind = _container(p)
        with open(p, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if kind == "safetensors":
                read_safetensors_header(f, p.name, size)
            else:
                _refuse_pickle_kind(p, kind)
                check_sizes(f, size, p.name, kind)
    except OSError as e:
        raise CheckpointReadError(f"Cannot read {p}: {e.strerror or e}.") from None


def _container(p: Path) -> str:
    """How to read `p`: "safetensors" or the PyTorch container `_sniff` names; refused when it is neither."""
    with open(p, "rb") as f:
        head = f.read(512)
    if not head:
        raise CheckpointReadError(f"{p.name}: the file is empty (0 bytes); it is not a checkpoint.")
    kind = _sniff(head)
    if p.suffix.lower() == ".safetensors":
        # A PyTorch file renamed to .safetensors is still read (safely); anything else as safetensors
        return kind if kind in ("zip", "legacy", "tar", "pickle") else "safetensors"
    if kind == "unknown" and p.suffix.lower() not in PICKLE_SUFFIXES:
        raise CheckpointReadError(f"{p.name}: not a checkpoint (expected .safetensors, .ckpt or .pt).")
    return kind


PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def check_input_path(path: str | os.PathLike[str]) -> str:
    """An input path that can be opened, or a CheckpointReadError that says why not (before any other work)."""
    text = os.fspath(path)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if "\0" in text:
        raise CheckpointReadError(f"The model path {text!r} contains a NUL byte; no file can have that name.")
    try:
        st = os.stat(text)
    except OSError as e:
        raise CheckpointReadError(_missing_reason(text, e)) from None
    if stat.S_ISDIR(st.st_mode):
        raise CheckpointReadError(f"{text} is a folder, not a checkpoint file.")
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointReadError(f"{text} is not a regular file (a device, pipe or socket), not a checkpoint.")
    return text


def _missing_reason(text: str, e: OSError) -> str:
    """Why `text` cannot be opened, in words: a symlink loop, a dangling symlink, or simply not there."""
    if e.errno == errno.ELOOP:
        return f"{text} is a symbolic link loop (it points back to itself); fix or remove the link."
    if os.path.islink(text):
        return f"{text} is a symbolic link to {os.readlink(text)}, which does not exist; fix or remove the link."
    if e.errno == errno.ENAMETOOLONG:
        return f"The path {text[:80]}... is too long for this system."
    if e.errno in (errno.ENOENT, errno.ENOTDIR):
        return f"File not found: {text}"
    return f"Cannot read {text}: {e.strerror or e}."


# What torch.save's legacy (non-zip) format starts with: its magic number, pickled with the protocol used.
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PREFIXES = tuple(pickle.dumps(_TORCH_LEGACY_MAGIC, protocol=n) for n in (2, 3))


def _sniff(head: bytes) -> str:
    """The container format from a file's first bytes: torch zip, torch legacy pickle, legacy tar, plain pickle,
    safetensors, or unknown."""
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if any(head.startswith(p) for p in _LEGACY_PREFIXES):
        return "legacy"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    if len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n <= SAFETENSORS_MAX_HEADER and head[8:9] == b"{":
            return "safetensors"
    return "unknown"


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

    def sha256(self, progress: HashProgress | None = None) -> str:
        """sha256 of the whole opened file (as the WebUI shows it), remembered per file version. `progress(done,
        total)` is called as it goes (see `_hash_open_file`)."""
        if self._sha256 is None:
            self._sha256 = _hash_open_file(self, progress)
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


def _open_with(p: Path, read: Callable[[Path, FileSource], Checkpoint]) -> Checkpoint:
    """`read(p, source)` over a fresh FileSource of `p`, closing it if reading fails (the checkpoint owns it)."""
    src = FileSource(p)
    try:
        return read(p, src)
    except BaseException:
        src.close()
        raise


def _open_safetensors(p: Path) -> Checkpoint:
    return _open_with(p, _read_safetensors)


def _read_safetensors(p: Path, src: FileSource) -> Checkpoint:
    metadata, tensors, data_start = read_safetensors_header(src.file, p.name, src.size)
    infos: dict[str, TensorInfo] = {}
    places: dict[str, tuple[str, int, int]] = {}
    for key, dtype, shape, begin in tensors:
        ck = canonical_key(key)
        infos[ck] = TensorInfo(shape, dtype)
        places[ck] = (key, data_start + begin, math.prod(shape))
    src.verify()  # the header just parsed belongs to the version whose identity was taken

    def get(key: str) -> torch.Tensor:
        _, offset, numel = places[key]
        info = infos[key]
        t = torch.empty(numel, dtype=info.dtype)
        if numel:  # into a fresh, aligned buffer (data misaligned in the file costs nothing extra)
            src.read_into(offset, memoryview(t.view(torch.uint8).numpy()))
        return t.view(info.shape)

    return Checkpoint(p, infos, get, metadata, source=src)


# The reference reader's limit (safetensors' MAX_HEADER_SIZE): a longer header is refused, not read.
SAFETENSORS_MAX_HEADER = 100_000_000


def read_safetensors_header(f: BinaryIO, name: str, size: int
                            ) -> tuple[dict[str, str], list[tuple[str, torch.dtype, tuple[int, ...], int]], int]:
    """Parse and validate a safetensors header exactly as strictly as the reference `safetensors` reader.

    Returns (metadata, [(key, dtype, shape, begin offset)], start of the data). Refused, each with one line: a
    header length that is huge or past the end of the file, JSON that is not UTF-8, not an object, nested too
    deep, with duplicate keys or NaN; a `__metadata__` that is not string to string; shape dims or offsets that
    are not non-negative integers (2.5, true, "3", -1); a byte size that does not match the shape; tensors that
    overlap, leave gaps, or do not cover the data exactly.
    """
    raw = f.read(8)
    if len(raw) < 8:
        raise CheckpointReadError(f"{name}: file is empty or truncated (no safetensors header).")
    (n,) = struct.unpack("<Q", raw)
    if n > SAFETENSORS_MAX_HEADER:
        raise CheckpointReadError(f"{name}: not a valid safetensors file (its header claims {n:,} bytes, more than "
                                  f"the format's limit of {SAFETENSORS_MAX_HEADER:,}); the file is corrupt or not a "
                                  "checkpoint.")
    if n < 2 or 8 + n > size:
        raise CheckpointReadError(f"{name}: not a valid safetensors file (header length {n}, file size "
                                  f"{size}); the file may be truncated or not a checkpoint.")

    def bad(what: str) -> CheckpointReadError:
        return CheckpointReadError(f"{name}: invalid safetensors header ({what}); the file is corrupt or was not "
                                   "written by a safetensors writer.")

    def pairs(items: list[tuple[str, object]]) -> dict[str, object]:
        out: dict[str, object] = {}
        for k, v in items:
            if k in out:
                raise bad(f"the key {_clip(repr(k), 60)} appears twice")
            out[k] = v
        return out

    def constant(c: str) -> object:
        raise bad(f"{c} is not valid JSON")

    header = parse_json(f.read(n), bad, object_pairs_hook=pairs, parse_constant=constant)
    if not isinstance(header, dict):
        raise bad(f"a JSON {type(header).__name__}, not an object")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise bad("__metadata__ must map strings to strings")

    def count(v: object) -> bool:  # a usize in the reference reader: an integer (not a bool), 0 <= v < 2**64
        return type(v) is int and 0 <= v < 2**64

    tensors = []
    spans = []
    for key, entry in header.items():
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise bad(f"tensor {_clip(repr(key), 60)} needs dtype, shape and data_offsets")
        dtype = SAFETENSORS_DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
        if dtype is None:
            raise CheckpointReadError(f"{name}: tensor {_clip(repr(key), 60)} has the unsupported dtype "
                                      f"{_clip(repr(entry['dtype']), 20)}; supported: "
                                      f"{', '.join(SAFETENSORS_DTYPES)}.")
        shape, offsets = entry["shape"], entry["data_offsets"]
        if not (isinstance(shape, list) and all(count(d) for d in shape)):
            raise bad(f"the shape of {_clip(repr(key), 60)} must be a list of non-negative integers, got "
                      f"{_clip(json.dumps(shape), 40)}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(count(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            raise bad(f"the data_offsets of {_clip(repr(key), 60)} must be two increasing non-negative integers, "
                      f"got {_clip(json.dumps(offsets), 40)}")
        numel = math.prod(shape)
        if numel * dtype.itemsize >= 2**64 or offsets[1] - offsets[0] != numel * dtype.itemsize:
            raise bad(f"tensor {_clip(repr(key), 60)} of shape {tuple(shape)} needs {numel * dtype.itemsize} "
                      f"bytes but its offsets span {offsets[1] - offsets[0]}")
        tensors.append((key, dtype, tuple(shape), offsets[0]))
        spans.append((offsets[0], offsets[1], key))
    data_len = size - 8 - n
    end = 0
    for begin, stop, key in sorted(spans):
        if begin != end:
            raise bad(f"tensor {_clip(repr(key), 60)} {'overlaps the one before it' if begin < end else 'leaves a gap'}"
                      f" (starts at byte {begin}, expected {end})")
        end = stop
    if end != data_len:
        if end > data_len:
            raise CheckpointReadError(f"{name}: the file is truncated ({size} bytes, its tensors need "
                                      f"{8 + n + end}).")
        raise bad(f"the tensors cover {end} bytes of data but the file holds {data_len}")
    metadata = {str(k): str(v) for k, v in (meta or {}).items()}
    return metadata, tensors, 8 + n


def _clip(text: str, limit: int) -> str:
    """`text` shortened to at most `limit` characters at a word boundary, with an ellipsis when cut."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    cut = text[:limit - 1]
    if " " in cut[limit // 2:]:
        cut = cut[:cut.rindex(" ")]
    return cut.rstrip(" ,.;:") + "…"


def _open_pickle(p: Path, kind: str) -> Checkpoint:
    _refuse_pickle_kind(p, kind)
    return _open_with(p, lambda p, src: _load_pickle(p, src, kind))


def _refuse_pickle_kind(p: Path, kind: str) -> None:
    """Refuse the containers that are not torch.save's zip or legacy format."""
    if kind == "tar":
        raise CheckpointReadError(
            f"{p.name}: this is PyTorch's legacy tar checkpoint format (torch 0.3 and older), which cannot be read "
            "without running its code. If you trust its source, load it in a trusted PyTorch and save it as "
            ".safetensors.")
    if kind == "pickle":
        raise CheckpointReadError(
            f"{p.name}: refused to load: this is a plain Python pickle, not a checkpoint saved by torch.save, and "
            "loading it could run code (nothing was executed). If you trust its source, convert it to .safetensors "
            "with a trusted tool.")
    if kind not in ("zip", "legacy"):
        raise CheckpointReadError(f"{p.name}: not a checkpoint (neither safetensors nor a PyTorch file); the file "
                                  "is corrupt or of another kind.")


def _load_pickle(p: Path, src: FileSource, kind: str) -> Checkpoint:
    # What torch.load would allocate is read from the file's own index first (torch_file_sizes.py): a small file
    # that declares gigabytes is refused before anything is allocated.
    check_sizes(src.file, src.size, p.name, kind)
    src.file.seek(0)
    try:
        # Read into memory, not memory-mapped (a mapped file that changes while it is read kills the process
        # with SIGBUS), from the descriptor that is hashed later, so the recorded hash is of these bytes. A file
        # handle also keeps torch.load from choosing its reader by the file's name (a .pt named .safetensors).
        obj = torch.load(src.file, map_location="cpu", weights_only=True)
        src.verify()
    except pickle.UnpicklingError as e:
        refused = re.search(r"Unsupported (?:global|operand)[^.]*", str(e))
        if refused is None:  # the unpickler choked on the bytes themselves: damage, not code
            raise CheckpointReadError(f"{p.name}: the PyTorch checkpoint is corrupt "
                                      f"({_clip(str(e).splitlines()[0] if str(e) else 'unreadable pickle', 120)}); "
                                      "download or export it again.") from None
        raise CheckpointReadError(
            f"{p.name}: refused to load: this pickle needs code beyond plain tensors ({_clip(refused.group(0), 120)})."
            " It was not executed. If you trust its source, convert it to .safetensors with a trusted tool."
        ) from None
    except (OSError, InputChangedError):
        raise
    except Exception as e:  # weights_only loading runs no code: anything else it raises means a damaged file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointReadError(f"{p.name}: the PyTorch checkpoint is truncated or corrupt ({_clip(first, 120)}); "
                                  "download or export it again.") from None
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
        raise OutputError(f"Output name '{_clip(p.name, 60)}' is too long for {parent} ({size} bytes; names there "
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


# Called with (bytes hashed, file size) while a file is hashed; what it raises (Cancelled) stops the hashing.
HashProgress = Callable[[int, int], None]
# How often hashing reports: a few times a second at the speed of a disk, so a cancel is seen promptly.
HASH_REPORT_BYTES = 64 << 20


def file_sha256(path: str | os.PathLike[str], progress: HashProgress | None = None) -> str:
    """sha256 of the whole file, as the WebUI shows it (the short hash is its first 10 hex digits).

    Remembered per file version (device, inode, size, modification time), so a recipe that pins its inputs and
    the merge that records them, or the same inputs merged again in the WebUI, read a 2 GB file once.
    """
    src = FileSource(Path(path))
    try:
        return _hash_open_file(src, progress)
    finally:
        src.close()


def _hash_open_file(src: FileSource, progress: HashProgress | None = None) -> str:
    cached = _SHA256_CACHE.get(src.identity)
    if cached is not None:
        return cached
    h = hashlib.sha256()
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    offset = reported = 0
    if progress is not None:
        progress(0, src.size)
    while offset < src.size:
        n = min(len(buf), src.size - offset)
        src.read_into(offset, view[:n])  # raises if the file changes while it is hashed
        h.update(view[:n])
        offset += n
        if progress is not None and offset - reported >= HASH_REPORT_BYTES:
            reported = offset
            progress(offset, src.size)
    _SHA256_CACHE[src.identity] = digest = h.hexdigest()
    return digest
