"""Same-base re-basin against a weighted sum (issue 22): CPU time, faults, peak RSS and a per-phase breakdown.

    python -m benchmarks.same_base A.safetensors B.safetensors --out-dir DIR [--pairs 2] [--lib DIR ...]

Runs `merge_checkpoints` with default options (UNet, text encoder and VAE; fp16 output) for `rebasin` and
`weighted_sum`, alternated (`--pairs` times each), each in a fresh process whose user + system CPU time, minor
page faults and peak RSS come from wait4(). With several `--lib` folders (e.g. an exported old version and this
tree) each pair runs every version in turn, so all figures share the machine's load. The worker times the phases
from outside the library (wrapping the functions that do them) in process CPU seconds:

    read    positional reads of input tensors (`FileSource.read_into`, outside hashing)
    hash    hashing the inputs for the metadata (the "hashing" stage)
    certify matching (the "matching" stage) minus its reads
    write   writing the output file (the file's write calls)
    blend   the rest of the writing stage: producing each output tensor (minus its reads)

The output's sha256 is printed per run, so versions can be compared bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def worker(method: str, a: str, b: str, out: str, result: str) -> None:
    import lib_rebasin.io.input_file as input_file
    import lib_rebasin.io.output_file as output_file
    from lib_rebasin.merge.run import merge_checkpoints
    from lib_rebasin.options import MergeOptions

    clock = time.process_time
    spent = {"read": 0.0, "write": 0.0}
    stage_read = {"read": 0.0}
    read_into = input_file.FileSource.read_into

    def timed_read(self: Any, offset: int, buf: memoryview) -> None:
        t = clock()
        try:
            read_into(self, offset, buf)
        finally:
            spent["read"] += clock() - t

    input_file.FileSource.read_into = timed_read  # type: ignore[method-assign]
    fdopen = output_file.os.fdopen

    class TimedFile:
        def __init__(self, f: Any) -> None:
            self.f = f

        def write(self, data: Any) -> int:
            t = clock()
            try:
                return self.f.write(data)
            finally:
                spent["write"] += clock() - t

        def __getattr__(self, name: str) -> Any:
            return getattr(self.f, name)

        def __enter__(self) -> TimedFile:
            self.f.__enter__()
            return self

        def __exit__(self, *exc: Any) -> Any:
            return self.f.__exit__(*exc)

    class TimedOs:
        def __getattr__(self, name: str) -> Any:
            return getattr(os, name)

        @staticmethod
        def fdopen(*args: Any, **kw: Any) -> TimedFile:
            return TimedFile(fdopen(*args, **kw))

    output_file.os = TimedOs()  # type: ignore[assignment]
    stages: dict[str, list[float]] = {}
    current: list[str] = []

    def progress(ev: Any) -> None:
        if not current or current[-1] != ev.stage:
            now = clock()
            if current:
                stages[current[-1]][1] += now - stages[current[-1]][0]
                stages[current[-1]][2] += spent["read"] - stage_read["read"]
            stages.setdefault(ev.stage, [0.0, 0.0, 0.0])[0] = now
            stage_read["read"] = spent["read"]
            current.append(ev.stage)

    t0, w0 = clock(), time.perf_counter()
    merge_checkpoints(a, b, out, MergeOptions(method=method, alpha=0.5, precision="fp16"), overwrite=True,
                      progress=progress)
    total, wall = clock() - t0, time.perf_counter() - w0
    progress(type("End", (), {"stage": "end"})())
    cpu = {k: v[1] for k, v in stages.items() if k != "end"}
    reads = {k: v[2] for k, v in stages.items() if k != "end"}
    phases = {"read": spent["read"] - reads.get("hashing", 0.0),
              "hash": cpu.get("hashing", 0.0),
              "certify": cpu.get("matching", 0.0) - reads.get("matching", 0.0),
              "write": spent["write"],
              "blend": cpu.get("writing", 0.0) - reads.get("writing", 0.0) - spent["write"]}
    Path(result).write_text(json.dumps({"cpu_in_merge": total, "wall_in_merge": wall, "phases": phases,
                                        "stages": cpu}))


def run_one(lib: Path, method: str, a: str, b: str, out_dir: Path) -> dict[str, Any]:
    result = out_dir / f"{method}.json"
    out = out_dir / f"{method}.safetensors"
    # Run as a script from outside any tree, so that `lib` alone decides which lib_rebasin is imported.
    env = {**os.environ, "PYTHONPATH": str(lib)}
    cmd = [sys.executable, __file__, "--worker", method, a, b, "--out-dir", str(out_dir)]
    from benchmarks.worker_process import measured, output_sha256  # the parent's import: a worker sees `lib` only

    usage = measured(cmd, out_dir, env, f"{method} with {lib}")
    rec = json.loads(result.read_text())
    # Hashed here, not in the worker, whose CPU time and peak RSS are then those of the merge command alone (hashing
    # the 2.1 GB output there added about 3 CPU s, half of it system time, to both methods and flattered their ratio).
    rec["sha256"] = output_sha256(out)
    out.unlink()
    result.unlink()
    rec.update(usage, lib=str(lib), method=method)
    return rec


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--out-dir", type=Path, required=True, help="where the outputs are written (and deleted)")
    p.add_argument("--pairs", type=int, default=2, help="re-basin / weighted-sum pairs per version")
    p.add_argument("--lib", type=Path, nargs="+", default=[REPO], help="versions of lib_rebasin to compare")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    ns.out_dir.mkdir(parents=True, exist_ok=True)
    if ns.worker:
        worker(ns.worker, ns.a, ns.b, str(ns.out_dir / f"{ns.worker}.safetensors"),
               str(ns.out_dir / f"{ns.worker}.json"))
        return 0
    print("command: python -m benchmarks.same_base " + shlex.join(argv if argv is not None else sys.argv[1:]))
    print(f"load average at start: {os.getloadavg()}", flush=True)
    runs = []
    for i in range(ns.pairs):
        for lib in ns.lib:
            for method in ("rebasin", "weighted_sum"):
                rec = run_one(lib.resolve(), method, ns.a, ns.b, ns.out_dir)
                rec["load"] = os.getloadavg()[0]
                runs.append(rec)
                ph = " ".join(f"{k} {v:.1f}" for k, v in rec["phases"].items())
                print(f"{lib.name:>12} {method:>13} pair {i + 1}: CPU {rec['cpu']:.1f} s (user {rec['user']:.1f}, "
                      f"sys {rec['sys']:.1f}), wall {rec['wall']:.1f} s, minflt {rec['minflt'] / 1e6:.2f} M, "
                      f"RSS {rec['rss_gb']:.2f} GB | {ph} | load {rec['load']:.2f} | {rec['sha256'][:16]}",
                      flush=True)
    for lib in ns.lib:
        mine = [r for r in runs if r["lib"] == str(lib.resolve())]
        rb = [r for r in mine if r["method"] == "rebasin"]
        ws = [r for r in mine if r["method"] == "weighted_sum"]
        mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
        print(f"{lib}: CPU ratio {mean(rb, 'cpu') / mean(ws, 'cpu'):.2f}x, wall ratio "
              f"{mean(rb, 'wall') / mean(ws, 'wall'):.2f}x; re-basin CPU {mean(rb, 'cpu'):.1f} s, weighted sum "
              f"{mean(ws, 'cpu'):.1f} s; peak RSS {max(r['rss_gb'] for r in rb):.2f} / "
              f"{max(r['rss_gb'] for r in ws):.2f} GB; minflt {mean(rb, 'minflt') / 1e6:.2f} / "
              f"{mean(ws, 'minflt') / 1e6:.2f} M; sha256 {sorted({r['sha256'][:16] for r in rb})} / "
              f"{sorted({r['sha256'][:16] for r in ws})}")
    (ns.out_dir / "same_base.json").write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
