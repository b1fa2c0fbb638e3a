"""Malformed safetensors headers, checked against the reference reader (the `safetensors` package).

For every file of the corpus: when the reference reader refuses it, `open_checkpoint` refuses it too, with a
one-line CheckpointReadError (never another exception); when the reference reads it, so do we, except where we
are stricter on purpose (a duplicate tensor name is ambiguous; dtypes SD checkpoints never use).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import safetensors

from lib_rebasin.io.checkpoint import open_checkpoint
from lib_rebasin.errors import CheckpointReadError

T = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}


def _file(header: object = None, data: bytes = b"", raw: bytes | None = None, n: int | None = None) -> bytes:
    h = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(h) if n is None else n) + h + data


def _t(shape: object, offsets: object, dtype: str = "F32") -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


CORPUS: dict[str, bytes] = {
    "valid": _file({"a": _t([2], [0, 8])}, b"\0" * 8),
    "valid_padded_header": _file(raw=json.dumps({"a": T}).encode() + b"    ", data=b"\0" * 4),
    "valid_empty": _file({}),
    "valid_zero_sized": _file({"a": _t([0], [0, 0]), "b": T}, b"\0" * 4),
    "valid_scalar": _file({"a": _t([], [0, 4])}, b"\0" * 4),
    "valid_metadata_null": _file({"__metadata__": None, "a": T}, b"\0" * 4),
    "valid_unknown_entry_field": _file({"a": {**T, "extra": 1}}, b"\0" * 4),
    "gap": _file({"a": T, "b": _t([1], [8, 12])}, b"\0" * 12),
    "overlap": _file({"a": _t([2], [0, 8]), "b": _t([1], [4, 8])}, b"\0" * 8),
    "not_from_zero": _file({"a": _t([1], [4, 8])}, b"\0" * 8),
    "trailing_data": _file({"a": T}, b"\0" * 8),
    "truncated_data": _file({"a": _t([4], [0, 16])}, b"\0" * 8),
    "reversed_offsets": _file({"a": _t([1], [4, 0])}, b"\0" * 4),
    "three_offsets": _file({"a": _t([1], [0, 4, 5])}, b"\0" * 4),
    "float_offset": _file({"a": _t([1], [0, 4.0])}, b"\0" * 4),
    "size_mismatch": _file({"a": _t([2], [0, 4])}, b"\0" * 4),
    "negative_dim": _file({"a": _t([-1], [0, 4])}, b"\0" * 4),
    "fractional_dim": _file({"a": _t([2.5], [0, 4])}, b"\0" * 4),
    "float_dim": _file({"a": _t([1.0], [0, 4])}, b"\0" * 4),
    "bool_dim": _file({"a": _t([True], [0, 4])}, b"\0" * 4),
    "string_dim": _file({"a": _t(["3"], [0, 4])}, b"\0" * 4),
    "shape_not_a_list": _file({"a": _t(1, [0, 4])}, b"\0" * 4),
    "dims_overflow": _file({"a": _t([2**62, 8], [0, 4])}, b"\0" * 4),
    "unknown_dtype": _file({"a": _t([1], [0, 4], "X32")}, b"\0" * 4),
    "missing_offsets": _file({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4),
    "entry_not_an_object": _file({"a": "x"}),
    "metadata_int_value": _file({"__metadata__": {"k": 1}, "a": T}, b"\0" * 4),
    "metadata_nested": _file({"__metadata__": {"k": {"x": "y"}}, "a": T}, b"\0" * 4),
    "metadata_list": _file({"__metadata__": ["k"], "a": T}, b"\0" * 4),
    "metadata_string": _file({"__metadata__": "k", "a": T}, b"\0" * 4),
    "deeply_nested": _file(raw=b'{"__metadata__":' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    "nested_200": _file(raw=b'{"a":' + b"[" * 200 + b"]" * 200 + b"}"),
    "dim_of_5000_digits": _file(raw=b'{"a":{"dtype":"F32","shape":[' + b"1" * 5000 + b'],"data_offsets":[0,4]}}',
                                data=b"\0" * 4),
    "metadata_number_of_5000_digits": _file(raw=b'{"__metadata__":{"k":' + b"9" * 5000 + b"}}"),
    "duplicate_field": _file(raw=b'{"a":{"dtype":"F32","dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
                             data=b"\0" * 4),
    "duplicate_metadata": _file(raw=b'{"__metadata__":{},"__metadata__":{},"a":' + json.dumps(T).encode() + b"}",
                                data=b"\0" * 4),
    "duplicate_tensor": _file(raw=b'{"a":' + json.dumps(T).encode() + b',"a":' + json.dumps(T).encode() + b"}",
                              data=b"\0" * 4),
    "nan_constant": _file(raw=b'{"__metadata__":{"k":NaN},"a":' + json.dumps(T).encode() + b"}", data=b"\0" * 4),
    "header_is_a_list": _file(raw=b"[]"),
    "not_utf8": _file(raw=b'{"\xff":1}'),
    "not_json": _file(raw=b"{nope}"),
    "header_huge": _file(raw=b"{}", n=2**40),
    "header_over_limit": _file(raw=b"{}", n=200_000_000),
    "header_past_end": _file(raw=b"{}", n=1000),
    "header_length_short": b"\x02\x00\x00",
}
# Stricter than the reference on purpose (it reads these): a duplicated tensor name is ambiguous.
STRICTER = {"duplicate_tensor"}


def _reference_reads(path: Path) -> bool:
    try:
        with safetensors.safe_open(str(path), "pt") as f:
            for k in f.keys():
                f.get_tensor(k)
        return True
    except Exception:
        return False


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_refused_exactly_like_the_reference_reader(tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.safetensors"
    path.write_bytes(CORPUS[name])
    reference = _reference_reads(path)
    if name.startswith("valid"):
        assert reference, "the corpus's valid files must be valid for the reference reader"
    try:
        with open_checkpoint(path) as ck:
            ck.keys()
        ours = None
    except CheckpointReadError as e:
        ours = str(e)
    if reference and name not in STRICTER:
        assert ours is None, ours
    else:
        assert ours is not None, "the reference reader refuses this file; so must we"
        assert "\n" not in ours and path.name in ours
