"""Temporary output files that a killed writer cannot leave behind.

An output is written into a temporary file in its own folder and put in place only when complete. Where the
system offers it (Linux `O_TMPFILE` on ext4, xfs, btrfs, tmpfs, ...), that file has no name until it is linked
into place: a writer killed by SIGKILL, a crash or a power cut leaves nothing, by construction. Elsewhere, and
in the instant between linking and renaming when an existing output is replaced, the file has a hidden name
that says who wrote it:

    .NAME.rebasin-<host>-<pid>-<start>-<nonce>.tmp

`host` tells this system (boot and pid namespace) from another that shares the folder, `start` is the writer's
start time (clock ticks since boot), so a pid reused by a newer process is not taken for the writer. Before
writing into a folder, `sweep_stale_temp_files` removes the files of this pattern whose writer is dead, and
older versions' leftovers (`.NAME.xxxxxxxx.tmp`, `.rebasin-probe-xxxxxxxx`) once nobody has touched them for an
hour. Files of another host are only removed after that hour too: their writer cannot be checked from here.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import socket
import stat
import time
from pathlib import Path

_TEMP_RE = re.compile(r"^\.(?P<final>.+)\.rebasin-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-(?P<start>\d+)-"
                      r"[0-9a-f]{6}\.tmp$")
# mkstemp names of earlier versions: `.{name}.XXXXXXXX.tmp` and `.rebasin-probe-XXXXXXXX`.
_LEGACY_RE = re.compile(r"^(\..+\.safetensors\.[a-z0-9_]{8}\.tmp|\.rebasin-probe-[a-z0-9_]{8})$")
# A temp file is written continuously from creation to rename: untouched this long, its writer is gone.
UNCHECKABLE_AGE_S = 3600.0
# The most characters `temp_name` adds to a final name: a pid of up to 10 digits, a start time of up to 12 (clock
# ticks since boot: centuries at 100 Hz). A final name longer than NAME_MAX minus this cannot be written.
TEMP_NAME_EXTRA = len(".") + len(".rebasin-") + 8 + 1 + 10 + 1 + 12 + 1 + 6 + len(".tmp")

# Whether to write through unnamed temp files where the system offers them (tests switch it off to exercise
# the named fallback that filesystems without O_TMPFILE get).
USE_UNNAMED = True


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _host_tag() -> str:
    """This system as seen from a shared folder: boot id and pid namespace (Linux), else the host name."""
    boot = _read("/proc/sys/kernel/random/boot_id")
    try:
        ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        ns = ""
    ident = f"{boot.strip()}:{ns}" if boot else socket.gethostname()
    return hashlib.sha256(ident.encode()).hexdigest()[:8]


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux); None if there is no such process.

    Returns 0 where the system does not say (then only the pid identifies the writer)."""
    if not os.path.isdir("/proc/self"):
        return 0 if _pid_alive(pid) else None
    text = _read(f"/proc/{pid}/stat")
    if text is None:
        return None
    try:
        return int(text.rsplit(")", 1)[1].split()[19])  # field 22; the name in parentheses may hold spaces
    except (IndexError, ValueError):
        return 0


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill would terminate it; without a safe check, never call a writer dead
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_HOST = _host_tag()


def temp_name(final: Path) -> str:
    """A fresh hidden temp name for `final`, in its folder, naming this process as the writer."""
    start = _start_time(os.getpid()) or 0
    return f".{final.name}.rebasin-{_HOST}-{os.getpid()}-{start}-{secrets.token_hex(3)}.tmp"


def _writer_is_dead(m: re.Match[str]) -> bool:
    pid, start = int(m["pid"]), int(m["start"])
    now = _start_time(pid)
    return now is None or (now != 0 and now != start)


def sweep_stale_temp_files(folder: Path) -> list[str]:
    """Remove our temp files in `folder` whose writer is dead; returns the names removed. Never raises."""
    removed: list[str] = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    now = time.time()
    for name in names:
        if not name.startswith("."):
            continue
        m = _TEMP_RE.match(name)
        if m is None and not _LEGACY_RE.match(name):
            continue
        path = os.path.join(folder, name)
        try:
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode):
                continue
            if m is not None and m["host"] == _HOST:
                stale = _writer_is_dead(m)
            else:  # an earlier version's name, or another system's writer: only the file's age can tell
                stale = now - st.st_mtime > UNCHECKABLE_AGE_S
            if stale:
                os.unlink(path)
                removed.append(name)
        except OSError:
            continue
    return removed


def _open_named(folder: Path, final: Path) -> tuple[int, Path]:
    while True:
        tmp = folder / temp_name(final)
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
                           | getattr(os, "O_CLOEXEC", 0), 0o600), tmp
        except FileExistsError:
            continue


def _open_unnamed(folder: Path) -> int | None:
    """An unnamed file in `folder` (Linux O_TMPFILE, linkable through /proc), or None where not offered."""
    if not USE_UNNAMED or not hasattr(os, "O_TMPFILE") or not os.path.isdir("/proc/self/fd"):
        return None
    try:
        return os.open(folder, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT):
            raise  # a real refusal: a named file would meet it too
        return None  # EOPNOTSUPP, EISDIR (old kernel), EINVAL, ...: this filesystem has no unnamed files


def open_temp_output(final: Path) -> tuple[int, Path | None]:
    """A file descriptor to write `final`'s data into, and its temp path (None: unnamed, nothing to clean up)."""
    folder = final.parent if str(final.parent) else Path(".")
    fd = _open_unnamed(folder)
    if fd is not None:
        return fd, None
    return _open_named(folder, final)


def place_output(fd: int, tmp: Path | None, final: Path, overwrite: bool) -> None:
    """Give the complete, flushed temp file its final name. Raises FileExistsError if `final` exists and
    `overwrite` is false (never clobbers); `tmp` (if any) is removed on failure by the caller."""
    if hasattr(os, "fchmod"):
        os.fchmod(fd, 0o644)  # what a checkpoint folder's files usually have (the temp file starts private)
    if tmp is None:
        _link_unnamed(fd, final, overwrite)
        return
    if overwrite:
        os.replace(tmp, final)
        return
    try:  # link() fails if the target appeared meanwhile: never clobber a file we were told not to
        os.link(tmp, final)
    except FileExistsError:
        raise
    except OSError:  # filesystems without hard links
        if final.exists():
            raise FileExistsError(errno.EEXIST, "exists", str(final)) from None
        os.replace(tmp, final)
        return
    os.unlink(tmp)


def _link_unnamed(fd: int, final: Path, overwrite: bool) -> None:
    # linkat(AT_SYMLINK_FOLLOW) on /proc/self/fd/N names the unnamed file (os.link only calls linkat, rather
    # than link(), which would try to link the /proc symlink itself, when given a directory fd).
    source = f"/proc/self/fd/{fd}"
    folder = os.open(final.parent if str(final.parent) else ".", os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        if not overwrite:
            os.link(source, final.name, dst_dir_fd=folder, follow_symlinks=True)  # fails if `final` exists
        else:
            # No atomic "link over": link under a sweepable temp name, then rename over the old file. A writer
            # killed in that instant leaves this name, which the next write into the folder removes.
            tmp = temp_name(final)
            os.link(source, tmp, dst_dir_fd=folder, follow_symlinks=True)
            try:
                os.replace(tmp, final.name, src_dir_fd=folder, dst_dir_fd=folder)
            except BaseException:
                _unlink(final.parent / tmp)
                raise
        with contextlib.suppress(OSError):
            os.fsync(folder)  # the new name survives a power cut too
    finally:
        os.close(folder)


def probe_writable(folder: Path) -> None:
    """Create and remove a file in `folder` (unnamed where possible); raises OSError if it cannot."""
    fd = _open_unnamed(folder)
    if fd is not None:
        os.close(fd)
        return
    fd, tmp = _open_named(folder, folder / "rebasin-probe")
    os.close(fd)
    os.unlink(tmp)


def _unlink(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
