"""SDXL at full size (issue 21, section 4): CPU time and peak RSS of every merge method on a same-base pair, the
same-base re-basin against the weighted sum alternated in one run, and an independent pair's weight matching.

    python -m benchmarks.sdxl X1.safetensors X2.safetensors --out-dir DIR [--pairs 1]
        [--base C.safetensors --methods add_difference ties dare]
        [--independent X3.safetensors [--independent-runs rebasin weighted_sum rebasin+activations
                                       weighted_sum+repair] [--max-sweeps N]]

Each merge runs `merge_checkpoints` with default options (UNet, both text encoders and the VAE; alpha 0.5; fp16
output) in a fresh process; its user + system CPU time and peak RSS come from wait4() on that process, so the
figures include start-up and imports. Order: `--pairs` times re-basin then weighted sum of A and B (alternated,
so both see the same machine load), then each of `--methods` once with C = `--base` (the three-input methods),
then each of `--independent-runs` once on A and `--independent` (default: re-basin alone; `--max-sweeps`, if
given, is the re-basins' option: a bounded measurement where the default stopping rule would run longer). A run is
a method with `+`-joined options: `activations` (matching = activations), `repair` (REPAIR), e.g.
`rebasin+activations`, or `weighted_sum+repair` (REPAIR's own cost, without a matching). The worker also reports
the CPU seconds of each stage of the merge (loading, hashing, matching, repair, writing, from the progress events)
and the matching's sweeps. The output's sha256 is taken by this parent process after the worker exits (not
counted), then the output is deleted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shlex
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


FLAGS = {"activations": {"matching": "activations"}, "repair": {"repair": True}}


def options_of(run: str, max_sweeps: int | None) -> dict[str, Any]:
    """MergeOptions' fields for a run spec `method[+flag...]` (FLAGS); max_sweeps applies to re-basin only."""
    method, *flags = run.split("+")
    unknown = [f for f in flags if f not in FLAGS]
    if unknown:
        raise SystemExit(f"unknown run flag {unknown[0]!r} in {run!r} (known: {', '.join(FLAGS)})")
    opts: dict[str, Any] = {"method": method, "alpha": 0.5, "precision": "fp16"}
    for f in flags:
        opts.update(FLAGS[f])
    if max_sweeps is not None and method == "rebasin":
        opts["max_sweeps"] = max_sweeps
    return opts


# Where a long merge is, from its progress messages: activation matching's passes, weight matching's sweeps,
# REPAIR's runs of each model.
PHASE = re.compile(r"\(pass \d+/\d+\)|sweep \d+|REPAIR: [^(,]*[a-zA-Z]")


def worker(run: str, a: str, b: str, c: str | None, out: str, result: str, max_sweeps: int | None) -> None:
    from lib_rebasin.merge.run import merge_checkpoints
    from lib_rebasin.options import MergeOptions

    clock = time.process_time
    stages: dict[str, float] = {}
    current: list[Any] = []
    marks: dict[str, tuple[float, float]] = {}  # phase -> (CPU s, wall s) since the merge began, at its start

    def progress(ev: Any) -> None:
        phase = PHASE.search(getattr(ev, "message", "") or "")
        if phase and phase[0] not in marks:
            marks[phase[0]] = (clock() - t0, time.perf_counter() - w0)
            # Printed as it happens, so that a run stopped at a time limit still shows where its time went.
            print(f"  {run}: {phase[0]} began at CPU {marks[phase[0]][0]:.1f} s, wall {marks[phase[0]][1]:.1f} s, "
                  f"peak RSS so far {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB", flush=True)
        if not current or current[0] != ev.stage:
            now = clock()
            if current:
                stages[current[0]] = stages.get(current[0], 0.0) + now - current[1]
            current[:] = [ev.stage, now]

    t0, w0 = clock(), time.perf_counter()
    res = merge_checkpoints(a, b, out, MergeOptions(**options_of(run, max_sweeps)), c=c, overwrite=True,
                            progress=progress)
    total, wall = clock() - t0, time.perf_counter() - w0
    progress(type("End", (), {"stage": "end"})())
    d = res.diagnostics
    Path(result).write_text(json.dumps({"cpu_in_merge": total, "wall_in_merge": wall, "stages": stages,
                                        "sweeps": sum(d.sweeps) if d.matched else None, "phases": marks,
                                        "certified": d.certified, "solves": d.solves, "moved": d.moved}))


def run_one(label: str, method: str, a: str, b: str, c: str | None, out_dir: Path,
            max_sweeps: int | None = None) -> dict[str, Any]:
    result = out_dir / f"{method}.json"
    out = out_dir / f"{method}.safetensors"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, __file__, a, b, "--out-dir", str(out_dir), "--worker", method]
    if c:
        cmd += ["--base", c]
    if max_sweeps is not None:
        cmd += ["--max-sweeps", str(max_sweeps)]
    from benchmarks.worker_process import measured, output_sha256

    load0 = os.getloadavg()[0]
    usage = measured(cmd, out_dir, env, f"{label} {method}")
    wall = usage["wall"]
    rec = json.loads(result.read_text())
    rec.update(usage, label=label, method=method, load=(load0, os.getloadavg()[0]), sha256=output_sha256(out),
               out_bytes=out.stat().st_size)
    out.unlink()
    result.unlink()
    st = " ".join(f"{k} {v:.1f}" for k, v in rec["stages"].items())
    print(f"{label:>16} {method:>14}: CPU {rec['cpu']:.1f} s (user {rec['user']:.1f}, sys {rec['sys']:.1f}; "
          f"in merge {rec['cpu_in_merge']:.1f}), wall {wall:.1f} s, peak RSS {rec['rss_gb']:.2f} GB | {st} | "
          f"sweeps {rec['sweeps']} | {phases(rec)} | load {load0:.1f}->{rec['load'][1]:.1f} | "
          f"{rec['sha256'][:16]}", flush=True)
    return rec


def phases(rec: dict[str, Any]) -> str:
    return ", ".join(f"{k} at CPU {c:.0f} s / wall {w:.0f} s" for k, (c, w) in rec.get("phases", {}).items())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--out-dir", type=Path, required=True, help="where the outputs are written (and deleted)")
    p.add_argument("--pairs", type=int, default=1, help="re-basin / weighted-sum pairs on A, B")
    p.add_argument("--base", default=None, help="C for the three-input methods")
    p.add_argument("--methods", nargs="*", default=[], help="three-input methods to run once each with C = --base")
    p.add_argument("--independent", default=None, help="a model of another base: merge A with it")
    p.add_argument("--independent-runs", nargs="*", default=["rebasin"],
                   help="runs on A and --independent, each once, in order: method[+activations][+repair]")
    p.add_argument("--max-sweeps", type=int, default=None, help="the re-basins' max_sweeps option")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    ns.out_dir.mkdir(parents=True, exist_ok=True)
    if ns.worker:
        worker(ns.worker, ns.a, ns.b, ns.base, str(ns.out_dir / f"{ns.worker}.safetensors"),
               str(ns.out_dir / f"{ns.worker}.json"), ns.max_sweeps)
        return 0
    if ns.methods and not ns.base:
        p.error("--methods needs --base")
    print("command: python -m benchmarks.sdxl " + shlex.join(argv if argv is not None else sys.argv[1:]))
    print(f"start {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, load average {os.getloadavg()}",
          flush=True)
    runs = []
    for i in range(ns.pairs):
        for method in ("rebasin", "weighted_sum"):
            runs.append(run_one(f"same-base {i + 1}", method, ns.a, ns.b, None, ns.out_dir))
    for method in ns.methods:
        runs.append(run_one("same-base, C", method, ns.a, ns.b, ns.base, ns.out_dir))
    for run in ns.independent_runs if ns.independent else []:
        options_of(run, None)  # an unknown flag stops here, before any run
    for run in ns.independent_runs if ns.independent else []:
        runs.append(run_one("independent", run, ns.a, ns.independent, None, ns.out_dir, ns.max_sweeps))
    pair = [r for r in runs if r["label"].startswith("same-base ")]
    if pair:
        def mean(m: str, k: str) -> float:
            rs = [r[k] for r in pair if r["method"] == m]
            return sum(rs) / len(rs)
        print(f"same-base re-basin / weighted sum: CPU {mean('rebasin', 'cpu'):.1f} / "
              f"{mean('weighted_sum', 'cpu'):.1f} s = {mean('rebasin', 'cpu') / mean('weighted_sum', 'cpu'):.2f}x "
              f"(in merge {mean('rebasin', 'cpu_in_merge') / mean('weighted_sum', 'cpu_in_merge'):.2f}x, wall "
              f"{mean('rebasin', 'wall') / mean('weighted_sum', 'wall'):.2f}x)")
    print("peak RSS per method (GB): " + ", ".join(f"{r['label']} {r['method']} {r['rss_gb']:.2f}" for r in runs))
    print(f"end {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}")
    (ns.out_dir / "sdxl.json").write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
