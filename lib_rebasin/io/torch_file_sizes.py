"""What a PyTorch checkpoint (.ckpt / .pt) will make `torch.load` allocate, read from the file's own index first.

`torch.load` allocates what a file declares before it reads the data: each zip record's inflated size, as the
archive's directory states it, and each storage's size, as the pickle's persistent ids state it ("storage",
type, key, location, numel). A small file can declare gigabytes: a zip record of deflated zeros (a zip bomb), or
a pickle that names a huge storage. So those declarations are read here without inflating any tensor record and
without executing the pickle (its opcodes are walked, `pickletools.genops`), and the file is refused in one line
when it declares more than an SD 1.x checkpoint can hold, or more than the file itself can back:

- torch.save writes every record uncompressed, each storage record exactly as long as its declared storage; a
  record of another size, a stored record that does not fit in the file, or compressed records that would
  inflate far beyond the file are refused, so no record is ever inflated beyond its declared tensor;
- the legacy (torch < 1.6) format keeps its storages raw after the pickle: they cannot declare more than the file.
"""

from __future__ import annotations

import io
import pickletools
import struct
import zipfile
from typing import BinaryIO, cast

from ..errors import CheckpointReadError
from ..messages import clipped

# The most tensor bytes an SD 1.x file holds: a training checkpoint with the weights in fp32 (1.07 B parameters:
# UNet 0.86 B, text encoder 0.12 B, VAE 0.08 B), an EMA copy of the UNet (0.86 B) and Adam's two moments of the
# UNet and text encoder (1.97 B) is 3.9 B floats, 15.6 GB; anything real is smaller (a full model with EMA, as
# v1-5-pruned.ckpt, is half of it). The bound leaves a margin above that.
MAX_TENSOR_BYTES = 15 * 2**30
# The index of a checkpoint (its pickle, its zip directory, the small records beside the storages) takes a few
# hundred bytes per tensor, and even a training checkpoint has a few thousand tensors: well under 2 MB.
MAX_INDEX_BYTES = 16 * 2**20
# Each pickle opcode makes at most one object: this bounds what walking (or loading) the pickle can build. A real
# checkpoint's pickle needs a few dozen opcodes per tensor.
MAX_PICKLE_OPS = 1_000_000
# Deflate shrinks trained float weights by far less than half; only near-constant data (zeros) shrinks more.
MAX_INFLATION = 4

# Bytes per element of the storage types persistent ids name (torch.storage's table, plus the untyped one).
STORAGE_ITEMSIZE = {"DoubleStorage": 8, "FloatStorage": 4, "HalfStorage": 2, "LongStorage": 8, "IntStorage": 4,
                    "ShortStorage": 2, "CharStorage": 1, "ByteStorage": 1, "BoolStorage": 1, "BFloat16Storage": 2,
                    "ComplexDoubleStorage": 16, "ComplexFloatStorage": 8, "QInt8Storage": 1, "QInt32Storage": 4,
                    "QUInt8Storage": 1, "QUInt4x2Storage": 1, "QUInt2x4Storage": 1, "UntypedStorage": 1}

class _Unknown:
    """A value the walk does not need to know."""

    def __repr__(self) -> str:
        return "?"


_MARK = object()
_ANY = _Unknown()
# Opcodes whose argument is the value they push.
_CONSTANTS = {"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "STRING", "BINSTRING",
              "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"}


def check_sizes(f: BinaryIO, size: int, name: str, kind: str) -> None:
    """Refuse (CheckpointReadError, one line) a PyTorch file of container `kind` ("zip" or "legacy") whose
    declared sizes torch.load must not be allowed to allocate. Leaves `f` at an unspecified position."""
    if kind == "zip":
        _check_zip(f, size, name)
    else:
        _check_legacy(f, size, name)


def _check_zip(f: BinaryIO, size: int, name: str) -> None:
    entries, directory = _zip_directory_size(f, size, name)
    if directory > MAX_INDEX_BYTES or entries > MAX_PICKLE_OPS:
        raise _index_error(name, f"zip directory ({entries:,} records)", directory)
    try:
        with zipfile.ZipFile(f) as z:  # reads the directory only: nothing is inflated here
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise _corrupt(name, f"its zip directory is unreadable: {_short(str(e))}") from None
    if not infos:
        raise _corrupt(name, "the archive is empty")
    records: dict[str, zipfile.ZipInfo] = {}
    for info in infos:  # torch finds records by name, ignoring case: two that differ only in case are ambiguous
        folded = info.filename.casefold()
        if folded in records:
            raise _corrupt(name, f"the archive holds {info.filename!r} twice")
        records[folded] = info
    prefix = infos[0].filename.split("/", 1)[0] + "/"  # torch reads the records under the first one's folder
    pkl = records.get((prefix + "data.pkl").casefold())
    if pkl is None:
        raise _corrupt(name, f"no {prefix}data.pkl in the archive")
    if pkl.file_size > MAX_INDEX_BYTES:
        raise _index_error(name, "pickle", pkl.file_size)
    with zipfile.ZipFile(f) as z:
        try:
            data = z.read(pkl)  # inflates at most the stated size, checked above
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as e:
            raise _corrupt(name, f"its pickle is unreadable: {e}") from None
    storages = _declared_storages(io.BytesIO(data), name, 5)
    _check_total(name, storages)
    record_of = {(prefix + "data/" + k).casefold(): k for k in storages}
    inflated = 0
    for info in infos:
        key = record_of.get(info.filename.casefold())
        if key is not None:
            if info.file_size != storages[key]:
                raise CheckpointReadError(
                    f"{name}: refused to load: its record {info.filename} holds {info.file_size:,} bytes but its "
                    f"pickle declares {storages[key]:,}; the file is damaged or was not written by torch.save.")
        elif info.file_size > MAX_INDEX_BYTES:
            raise _index_error(name, f"record {info.filename}", info.file_size)
        if info.compress_type != zipfile.ZIP_STORED:
            inflated += info.file_size
        elif info.compress_size != info.file_size or info.header_offset + info.compress_size > size:
            # torch allocates the stated size before it reads: a stored record must lie within the file
            raise _corrupt(name, f"the record {info.filename} claims {info.file_size:,} bytes that the "
                                 f"{size:,}-byte file does not hold")
    if inflated > MAX_INFLATION * size:
        from .output_file import format_bytes

        raise CheckpointReadError(
            f"{name}: refused to load: its compressed records would inflate to {format_bytes(inflated)} from a "
            f"{format_bytes(size)} file; PyTorch never compresses them, and real weights do not shrink like that "
            "(a zip bomb, or a damaged file).")
    missing = [k for k in storages if (prefix + "data/" + k).casefold() not in records]
    if missing:
        raise _corrupt(name, f"the storage record {prefix}data/{missing[0]} is missing")


def _check_legacy(f: BinaryIO, size: int, name: str) -> None:
    """torch < 1.6: three small pickles (magic number, protocol, system info), the main pickle, then the raw
    storages. Everything up to the end of the main pickle is the index."""
    f.seek(0)
    head = io.BytesIO(f.read(min(size, MAX_INDEX_BYTES)))
    cut = MAX_INDEX_BYTES if size > MAX_INDEX_BYTES else None
    for _ in range(3):
        _walk(head, name, cut)
    storages = _declared_storages(head, name, 6, cut)
    _check_total(name, storages)
    total = sum(storages.values())
    if total > size:
        from .output_file import format_bytes

        raise CheckpointReadError(
            f"{name}: refused to load: it declares {format_bytes(total)} of tensors but the file holds only "
            f"{format_bytes(size)}; the file is truncated or damaged.")


def _check_total(name: str, storages: dict[str, int]) -> None:
    total = sum(storages.values())
    if total > MAX_TENSOR_BYTES:
        from .output_file import format_bytes

        raise CheckpointReadError(
            f"{name}: refused to load: it declares {format_bytes(total)} of tensors, more than any SD 1.x "
            f"checkpoint holds (at most {format_bytes(MAX_TENSOR_BYTES)}, with EMA and optimizer state); the file is "
            "damaged or not an SD 1.x model.")


def _declared_storages(data: io.BytesIO, name: str, fields: int, cut: int | None = None) -> dict[str, int]:
    """{storage key: declared bytes} from the persistent ids of the pickle at `data`'s position."""
    storages: dict[str, int] = {}
    for pid in _walk(data, name, cut):
        if not (isinstance(pid, tuple) and len(pid) == fields and pid[0] == "storage"):
            continue  # not a storage (torch's loader refuses whatever else it is)
        type_name, key, numel = pid[1], pid[2], pid[4]
        if not isinstance(type_name, str) or not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise _corrupt(name, f"a storage is declared as {_short(pid)}")
        itemsize = STORAGE_ITEMSIZE.get(type_name.rpartition(" ")[2].rpartition(".")[2])
        if itemsize is None:
            raise _corrupt(name, f"unknown storage type {_short(type_name)}")
        storages[key] = max(storages.get(key, 0), numel * itemsize)
    return storages


def _walk(data: io.BytesIO, name: str, cut: int | None = None) -> list[object]:
    """Walk one pickle's opcodes without executing them; return the persistent ids it declares (the values
    the walk can know: strings, integers, globals as "module name", tuples of those; anything else is _ANY).
    `cut`: `data` holds only the file's first `cut` bytes."""
    stack: list[object] = []
    memo: dict[int, object] = {}
    pids: list[object] = []
    try:
        for n, (op, arg, _) in enumerate(pickletools.genops(data)):
            if n > MAX_PICKLE_OPS:
                raise CheckpointReadError(f"{name}: refused to load: its pickle has more than {MAX_PICKLE_OPS:,} "
                                          "operations, far more than a checkpoint's index needs; the file is "
                                          "damaged or not a checkpoint.")
            code = op.name
            if code in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[cast(int, arg)] = stack[-1]  # the memo opcodes' argument is the index
            elif code == "MEMOIZE":
                memo[len(memo)] = stack[-1]
            elif code in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo.get(cast(int, arg), _ANY))
            elif code == "DUP":
                stack.append(stack[-1])
            elif code == "MARK":
                stack.append(_MARK)
            elif code in ("TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_TUPLE"):
                if code == "TUPLE":
                    at = _mark_index(stack)
                    items, stack[at:] = stack[at + 1:], []
                else:
                    k = int(code[-1]) if code[-1].isdigit() else 0
                    items = stack[len(stack) - k:] if k else []
                    del stack[len(stack) - k:]
                stack.append(tuple(items))
            elif code == "GLOBAL":
                stack.append(str(arg))
            elif code == "STACK_GLOBAL":
                attr, module = stack.pop(), stack.pop()
                stack.append(f"{attr} {module}" if isinstance(attr, str) and isinstance(module, str) else _ANY)
            elif code in ("BINPERSID", "PERSID"):
                pid = stack.pop() if code == "BINPERSID" else arg
                pids.append(pid)
                stack.append(_ANY)
            elif code == "STOP":
                break
            else:
                _generic(op, arg, stack)
    except CheckpointReadError:
        raise
    except (ValueError, IndexError, EOFError, struct.error, UnicodeDecodeError) as e:
        if cut is not None and data.tell() >= cut:  # it goes on beyond what an index may take
            raise _index_error(name, "pickle", cut, more=True) from None
        raise _corrupt(name, f"its pickle is unreadable: {_short(str(e) or type(e).__name__)}") from None
    return pids


def _generic(op: pickletools.OpcodeInfo, arg: object, stack: list[object]) -> None:
    """Any other opcode: pop what it consumes, push what it makes (its value when it is a plain constant)."""
    before = op.stack_before
    if pickletools.markobject in before:
        at = _mark_index(stack)
        del stack[at:]
        extra = before.index(pickletools.markobject)
        if extra:
            if len(stack) < extra:
                raise IndexError("stack underflow")
            del stack[len(stack) - extra:]
    elif before:
        if len(stack) < len(before):
            raise IndexError("stack underflow")
        del stack[len(stack) - len(before):]
    for _ in op.stack_after:
        stack.append(arg if op.name in _CONSTANTS and isinstance(arg, (str, int)) and not isinstance(arg, bool)
                     else _ANY)


def _mark_index(stack: list[object]) -> int:
    for i in range(len(stack) - 1, -1, -1):
        if stack[i] is _MARK:
            return i
    raise IndexError("no mark on the stack")


def _zip_directory_size(f: BinaryIO, size: int, name: str) -> tuple[int, int]:
    """(records, bytes) of the zip's central directory, from its end record (zip64 too), before reading it."""
    tail_len = min(size, 22 + 65535)  # the end record is followed by at most a 64 KiB comment
    f.seek(size - tail_len)
    tail = f.read(tail_len)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < 22:
        raise _corrupt(name, "the zip archive has no end record (truncated?)")
    entries, directory = struct.unpack("<H", tail[at + 10:at + 12])[0], struct.unpack("<I", tail[at + 12:at + 16])[0]
    if (entries == 0xFFFF or directory == 0xFFFFFFFF) and at >= 20 and tail[at - 20:at - 16] == b"PK\x06\x07":
        (offset,) = struct.unpack("<Q", tail[at - 12:at - 4])
        f.seek(offset)
        record = f.read(56)
        if len(record) < 56 or record[:4] != b"PK\x06\x06":
            raise _corrupt(name, "its zip64 end record is missing")
        entries, directory = struct.unpack("<QQ", record[32:48])
    return entries, directory


def _index_error(name: str, what: str, n: int, more: bool = False) -> CheckpointReadError:
    from .output_file import format_bytes

    return CheckpointReadError(f"{name}: refused to load: its {what} takes {'more than ' if more else ''}"
                               f"{format_bytes(n)}, far more than a "
                               f"checkpoint's index needs (at most {format_bytes(MAX_INDEX_BYTES)}); the file is "
                               "damaged or not a checkpoint.")


def _corrupt(name: str, why: str) -> CheckpointReadError:
    return CheckpointReadError(f"{name}: the PyTorch checkpoint is truncated or corrupt ({why}); download or export "
                               "it again.")


def _short(value: object) -> str:
    return clipped(value if isinstance(value, str) else repr(value), 80)
