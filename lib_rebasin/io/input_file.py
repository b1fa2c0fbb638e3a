"""An input file: its path checked before anything else, read by checked positional reads, and hashed.

Reads are positional reads into fresh buffers, not a memory map, on purpose: a mapped file that is truncated or
rewritten while it is read kills the process with SIGBUS (and with it the whole WebUI); a read returns short
instead, and every read checks the open file against what was opened, so a changed input becomes an
`InputChangedError`. The sha256 recorded for an input is the hash of the open file (the same inode the tensors
came from), so a file replaced by rename during a merge cannot give the output the new file's hash.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import CheckpointReadError, InputChangedError


def check_input_path(path: str | bytes | os.PathLike[str] | os.PathLike[bytes]) -> str:
    """An input path that can be opened, or a CheckpointReadError that says why not (before any other work).

    A bytes path (which Python's own file functions accept) is decoded as the file system does."""
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


class FileSource:
    """An open input file read by positional reads, and the identity (size, modification time) it had when opened.

    Every read is checked: a short read (the file was truncated) or a changed size or modification time (it was
    rewritten in place) raises InputChangedError instead of handing out bytes of another version of the file. A
    file replaced by rename is not an error: this descriptor still reads, consistently, the version it opened.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = open(path, "rb")  # noqa: SIM115 -- held for the object's life; close() closes it
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


def hash_sources(sources: Sequence[FileSource], progress: HashProgress | None = None) -> None:
    """Hash several open files at once; each then remembers its sha256 (`FileSource.sha256` returns it without
    reading again). One thread per file beyond the first, up to the CPUs this process may use: reading and sha256
    both release the GIL, so two 2 GB inputs take about as long as one. `progress(done, total)`, over all of them,
    runs on this thread only, a few times a second; what it raises (a cancel) stops every thread before it is
    raised here, as does an error of any file (changed since it was opened, unreadable)."""
    todo: dict[tuple[int, int, int, int], FileSource] = {}
    for src in sources:
        if src._sha256 is None and src.identity not in _SHA256_CACHE:
            todo.setdefault(src.identity, src)  # one file given twice is hashed once
    files = list(todo.values())
    threads = min(len(files), _usable_cpus())
    if threads <= 1:
        _hash_in_turn(files, progress)
        return
    total = sum(src.size for src in files)
    done = [0] * len(files)
    stop = threading.Event()
    errors: list[BaseException] = []

    reported = 0

    def counted(i: int, reporting: bool) -> HashProgress:
        """File i's progress: its bytes done, a stop seen, and (`reporting`: on the calling thread) the total
        reported every HASH_REPORT_BYTES."""
        def on_chunk(n: int, _size: int) -> None:
            nonlocal reported
            done[i] = n
            if stop.is_set():
                raise _Stopped
            if reporting and progress is not None and sum(done) - reported >= HASH_REPORT_BYTES:
                reported = sum(done)
                progress(reported, total)
        return on_chunk

    def work(group: list[int]) -> None:
        try:
            for i in group:
                files[i].sha256(counted(i, False))
        except _Stopped:
            pass
        except BaseException as e:  # handed to the calling thread, which raises it
            errors.append(e)
            stop.set()

    groups = [list(range(k, len(files), threads)) for k in range(threads)]  # file i on thread i % threads
    workers = [threading.Thread(target=work, args=(g,), name="lib_rebasin-hash", daemon=True) for g in groups[1:]]
    for t in workers:
        t.start()
    try:
        if progress is not None:
            progress(0, total)
        for i in groups[0]:
            files[i].sha256(counted(i, True))
        while any(t.is_alive() for t in workers):
            for t in workers:
                t.join(_WAIT_REPORT_SECONDS)
            if progress is not None:
                progress(sum(done), total)
    except _Stopped:
        pass
    except BaseException:
        stop.set()
        raise
    finally:
        stop.set()  # whatever ended this thread's part ends the others' at their next chunk
        for t in workers:
            t.join()
    if errors:
        raise errors[0]


class _Stopped(Exception):
    """Ends a hashing thread whose batch was stopped (a cancel or another file's error)."""


# How often the calling thread reports while it waits for the other hashing threads.
_WAIT_REPORT_SECONDS = 0.25


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _hash_in_turn(files: list[FileSource], progress: HashProgress | None) -> None:
    """`hash_sources` on one thread: the files one after the other, their progress as one."""
    total = sum(src.size for src in files)
    before = 0

    def shifted(n: int, _size: int) -> None:
        if progress is not None:
            progress(before + n, total)

    for src in files:
        src.sha256(shifted)
        before += src.size


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
