"""Checkpoint files: a lazily read state dict over a .safetensors, .ckpt or .pt file (or tensors in memory).

Reading a safetensors file parses its header and then reads each tensor, when asked for, with a checked positional
read into a fresh buffer (`input_file.FileSource`), so a 2 GB checkpoint costs nothing until a tensor is needed
and memory is only what the caller keeps. PyTorch files are loaded whole, safely (`io/pickle_checkpoint.py`).

Keys are normalised on the way in (nested `state_dict`, the old text-encoder layout without `text_model.`), so the
rest of the library sees one canonical SD 1.x layout. Writing is `io/output_file.py`.
"""

from __future__ import annotations

import math
import os
import pickle
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointReadError
from .input_file import FileSource, HashProgress, check_input_path
from .pickle_checkpoint import load_pickle_tensors, refuse_pickle_kind
from .safetensors_format import SAFETENSORS_MAX_HEADER, read_safetensors_header
from .torch_file_sizes import check_sizes

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
                 in_memory: bool = False, source: FileSource | None = None) -> None:
        self.path = path
        self.infos = infos
        self._get = getter
        self.metadata = metadata
        self._closer = closer
        self.in_memory = in_memory
        self.source = source  # the open file the tensors come from (None: in memory)

    def keys(self) -> list[str]:
        return list(self.infos)

    def __iter__(self) -> Iterator[str]:
        """The keys, in the file's order (as `keys()`, without the copy)."""
        return iter(self.infos)

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

    def sha256(self, progress: HashProgress | None = None) -> str | None:
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

    def __enter__(self) -> Checkpoint:
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
                refuse_pickle_kind(p, kind)
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
            src.read_into(offset, t.view(torch.uint8).numpy().data)
        return t.view(info.shape)

    return Checkpoint(p, infos, get, metadata, source=src)


def _open_pickle(p: Path, kind: str) -> Checkpoint:
    refuse_pickle_kind(p, kind)
    return _open_with(p, lambda p, src: _load_pickle(p, src, kind))


def _load_pickle(p: Path, src: FileSource, kind: str) -> Checkpoint:
    tensors = {canonical_key(k): v for k, v in load_pickle_tensors(p, src, kind).items()}
    infos = {k: TensorInfo(tuple(v.shape), v.dtype) for k, v in tensors.items()}
    return Checkpoint(p, infos, tensors.__getitem__, {}, tensors.clear, source=src)
