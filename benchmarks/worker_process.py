"""One measured run in a fresh process (the benchmarks' workers): its CPU time, minor page faults and peak RSS
come from wait4() on that process, its wall time from the parent's clock. The parent hashes what a worker wrote
(`output_sha256`), so that hashing is never counted as the worker's."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path


def measured(cmd: list[str], cwd: Path, env: dict[str, str], what: str) -> dict[str, float]:
    """Run `cmd` to its end; SystemExit naming `what` if it fails."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{what} failed")
    return {"cpu": usage.ru_utime + usage.ru_stime, "user": usage.ru_utime, "sys": usage.ru_stime, "wall": wall,
            "minflt": usage.ru_minflt, "rss_gb": usage.ru_maxrss / 2**20}


def output_sha256(path: Path) -> str:
    """sha256 of a worker's output, read by the parent after the worker exited."""
    h = hashlib.sha256()
    buf = memoryview(bytearray(1 << 24))
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(buf[:n])
    return h.hexdigest()
