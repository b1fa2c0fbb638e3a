"""What a sweep costs beside one merge: `sweep_checkpoints` at N alphas against `merge_checkpoints` at one,
alternated in one process so both see the same machine load, on the independent synthetic pair (X of run.py).

    nice -n 10 python -m benchmarks.sweep --scale mini --rounds 2
    nice -n 10 python -m benchmarks.sweep --scale full --rounds 1 --method rebasin

Prints one line per run and the ratios of the medians (wall time and this process's CPU time); results go into
`sweep_results.md` with the machine, the date and the command.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from lib_rebasin.merge.run import merge_checkpoints
from lib_rebasin.merge.sweep import sweep_checkpoints
from lib_rebasin.options import MergeOptions

from .run import REPO, ensure_pair


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", default="mini", choices=("tiny", "mini", "full"))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--alphas", default="0.25,0.5,0.75")
    ap.add_argument("--method", default="rebasin")
    ap.add_argument("--data", default=os.environ.get("BENCH_DATA", str(REPO / "bench_data")))
    args = ap.parse_args(argv)
    alphas = [float(x) for x in args.alphas.split(",")]
    a, b = ensure_pair(Path(args.data), args.scale, "X")
    options = MergeOptions(method=args.method, alpha=alphas[len(alphas) // 2])
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {_cpu_model()}, {os.cpu_count()} CPUs; "
          f"load {os.getloadavg()[0]:.1f}; commit {commit}; scale {args.scale}, pair X (independent), "
          f"{args.method}, alphas {alphas}", flush=True)
    single: list[tuple[float, float]] = []
    swept: list[tuple[float, float]] = []
    with tempfile.TemporaryDirectory(dir=Path(args.data)) as tmp:
        out = Path(tmp)
        for r in range(args.rounds):
            # alternate which goes first, so a load change over the run does not favour one
            order = ("single", "sweep") if r % 2 == 0 else ("sweep", "single")
            for kind in order:
                if kind == "single":
                    t = _timed(lambda: merge_checkpoints(a, b, out / "single.safetensors", options, overwrite=True))
                    single.append(t)
                else:
                    t = _timed(lambda: sweep_checkpoints(a, b, out / "sweep_{alpha}.safetensors", options, alphas,
                                                         overwrite=True))
                    swept.append(t)
                for f in out.glob("*.safetensors"):  # full-size outputs are 2 GB each: keep none around
                    f.unlink()
                print(f"round {r + 1} {kind:6s} wall {t[0]:8.1f} s  cpu {t[1]:8.1f} s  load "
                      f"{os.getloadavg()[0]:.1f}", flush=True)
    for i, what in enumerate(("wall", "cpu")):
        s = statistics.median(x[i] for x in single)
        w = statistics.median(x[i] for x in swept)
        print(f"median {what}: one merge {s:.1f} s, {len(alphas)} alphas {w:.1f} s, ratio {w / s:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
