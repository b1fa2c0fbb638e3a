"""The safetensors format: its dtype names and its header, read exactly as strictly as the reference reader and
written in the layout it expects."""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from typing import BinaryIO

import torch

from ..errors import CheckpointReadError
from ..messages import clipped
from .parsing import parse_json

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}

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
                raise bad(f"the key {clipped(repr(k), 60)} appears twice")
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
            raise bad(f"tensor {clipped(repr(key), 60)} needs dtype, shape and data_offsets")
        dtype = SAFETENSORS_DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
        if dtype is None:
            raise CheckpointReadError(f"{name}: tensor {clipped(repr(key), 60)} has the unsupported dtype "
                                      f"{clipped(repr(entry['dtype']), 20)}; supported: "
                                      f"{', '.join(SAFETENSORS_DTYPES)}.")
        shape, offsets = entry["shape"], entry["data_offsets"]
        if not (isinstance(shape, list) and all(count(d) for d in shape)):
            raise bad(f"the shape of {clipped(repr(key), 60)} must be a list of non-negative integers, got "
                      f"{clipped(json.dumps(shape), 40)}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(count(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            raise bad(f"the data_offsets of {clipped(repr(key), 60)} must be two increasing non-negative integers, "
                      f"got {clipped(json.dumps(offsets), 40)}")
        numel = math.prod(shape)
        if numel * dtype.itemsize >= 2**64 or offsets[1] - offsets[0] != numel * dtype.itemsize:
            raise bad(f"tensor {clipped(repr(key), 60)} of shape {tuple(shape)} needs {numel * dtype.itemsize} "
                      f"bytes but its offsets span {offsets[1] - offsets[0]}")
        tensors.append((key, dtype, tuple(shape), offsets[0]))
        spans.append((offsets[0], offsets[1], key))
    data_len = size - 8 - n
    end = 0
    for begin, stop, key in sorted(spans):
        if begin != end:
            what = "overlaps the one before it" if begin < end else "leaves a gap"
            raise bad(f"tensor {clipped(repr(key), 60)} {what} (starts at byte {begin}, expected {end})")
        end = stop
    if end != data_len:
        if end > data_len:
            raise CheckpointReadError(f"{name}: the file is truncated ({size} bytes, its tensors need "
                                      f"{8 + n + end}).")
        raise bad(f"the tensors cover {end} bytes of data but the file holds {data_len}")
    metadata = {str(k): str(v) for k, v in (meta or {}).items()}
    return metadata, tensors, 8 + n


def header_bytes(header: Mapping[str, object], reserve: int) -> bytes:
    """The JSON header, space-padded (as the format allows) to a multiple of 8 plus `reserve` spare bytes."""
    blob = json.dumps(header, separators=(",", ":")).encode()
    return blob + b" " * (-len(blob) % 8 + reserve)
