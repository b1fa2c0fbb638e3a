"""Weight matching of an independently trained pair (issue 22, section 2): wall and CPU time, peak RSS and where the
matching's time goes, for one or more versions of lib_rebasin alternated on one pair.

    python -m benchmarks.independent A.safetensors B.safetensors --out-dir DIR [--runs 2] [--lib OLD NEW ...]
        [--max-sweeps N] [--tolerance T] [--json FILE]

Each run is `merge_checkpoints` with method `rebasin` and default options (UNet, text encoder and VAE; the default
tolerance; fp16 output) in a fresh process, run as a script from outside any tree so that `--lib` alone decides
which lib_rebasin is imported; the versions take turns (`--runs` rounds of all of them), so they share the machine's
load. User + system CPU time and peak RSS come from wait4(). The worker splits the matching stage's CPU seconds by
wrapping, from outside the library, the functions that do the work (process CPU time, all threads):

    cost     computing cost matrices in full (`cost_matrix`)
    update   bringing kept cost matrices up to date (`CostCache._update`, versions that have it)
    lap      the assignment solves (`solve`): the CPU time of the thread that ran each
    proof    the partial-certificate attempts (`prove_current`)
    other    the rest of the matching stage (reads of the inputs, bookkeeping)

Where solves run on another thread while the main thread computes the next cost matrices, process CPU time cannot
be split by phase: cost, update and proof then include what the solving thread spent meanwhile, and other is the
matching stage minus cost, update, proof and the solves that ran on the main thread.

and reports the stages of the merge (hashing, matching, writing) from its progress events. Each run saves B's
permutations; the parent compares them across versions, and where they differ computes each version's objective
sum_k <A_k, pi(B)_k> in float64 over the spec's permuted keys (in a separate, untimed process), so that results
can be judged by the tolerance rule (the same permutations, or the same objective within 1e-5 relative).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

PHASES = ("cost", "update", "lap", "proof")


def worker(a: str, b: str, out: str, result: str, perms_out: str, options: dict[str, Any]) -> None:
    import torch

    import lib_rebasin.align.weight_matching as wm
    from lib_rebasin.merge.run import merge_checkpoints
    from lib_rebasin.options import MergeOptions

    clock = time.process_time
    spent = dict.fromkeys((*PHASES, "lap_inline"), 0.0)
    local = threading.local()
    main = threading.get_ident()

    def timed(phase: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kw: Any) -> Any:
            # Only the outermost timed call of a thread counts (a full matrix computed inside an update is the
            # update's).
            if getattr(local, "depth", 0):
                return fn(*args, **kw)
            local.depth = 1
            t, tt = clock(), time.thread_time()
            try:
                return fn(*args, **kw)
            finally:
                if phase == "lap":
                    # A solve is single-threaded: its own thread's CPU time, wherever it ran.
                    spent["lap"] += time.thread_time() - tt
                    if threading.get_ident() == main:
                        spent["lap_inline"] += clock() - t
                else:
                    spent[phase] += clock() - t
                local.depth = 0
        return wrapper

    wm.solve = timed("lap", wm.solve)  # type: ignore[attr-defined]
    if hasattr(wm, "CurrentProof"):  # the nearest-partner certificate: one object per search
        wm.CurrentProof.prove = timed("proof", wm.CurrentProof.prove)  # type: ignore[method-assign]
    else:  # versions before it
        wm.prove_current = timed("proof", wm.prove_current)  # type: ignore[attr-defined]
    try:
        import lib_rebasin.align.cost_cache as cc
        cc.cost_matrix = timed("cost", cc.cost_matrix)  # type: ignore[attr-defined]
        cc.CostCache._update = timed("update", cc.CostCache._update)  # type: ignore[method-assign]
    except ImportError:
        wm.cost_matrix = timed("cost", wm.cost_matrix)  # type: ignore[attr-defined]
    found: list[Any] = []
    weight_matching = wm.weight_matching

    def capture(*args: Any, **kw: Any) -> Any:
        res = weight_matching(*args, **kw)
        found.append(res)
        return res

    import lib_rebasin.merge.alignment as alignment
    alignment.weight_matching = capture  # type: ignore[attr-defined]

    stages: dict[str, float] = {}
    current: list[Any] = []

    def progress(ev: Any) -> None:
        if not current or current[0] != ev.stage:
            now = clock()
            if current:
                stages[current[0]] = stages.get(current[0], 0.0) + now - current[1]
            current[:] = [ev.stage, now]

    t0, w0 = clock(), time.perf_counter()
    res = merge_checkpoints(a, b, out, MergeOptions(method="rebasin", alpha=0.5, precision="fp16", **options),
                            overwrite=True, progress=progress)
    total, wall = clock() - t0, time.perf_counter() - w0
    progress(type("End", (), {"stage": "end"})())
    d = res.diagnostics
    perms = {k: v for r in found for k, v in r.perms.items()}
    torch.save(perms, perms_out)
    matching = stages.get("matching", 0.0)
    inline = spent.pop("lap_inline")
    phases = {**spent, "other": matching - inline - sum(v for k, v in spent.items() if k != "lap")}
    cost = [getattr(r, "cost", None) for r in found]
    Path(result).write_text(json.dumps({
        "cpu_in_merge": total, "wall_in_merge": wall, "stages": stages, "phases": phases,
        "sweeps": sum(d.sweeps), "solves": d.solves, "certified": d.certified,
        "cost_stats": [vars(c) for c in cost if c is not None]}))


def objective(a: str, b: str, perms_path: str) -> float:
    """sum_k <A_k, pi(B)_k> in float64 over every key a matched group permutes."""
    import torch

    from lib_rebasin.align.permute import permute_tensor
    from lib_rebasin.io.checkpoint import open_checkpoint
    from lib_rebasin.sd1.config import detect
    from lib_rebasin.sd1.spec import build_spec

    perms = torch.load(perms_path)
    total = 0.0
    with open_checkpoint(a) as ca, open_checkpoint(b) as cb:
        spec = build_spec(detect(ca.shapes()))
        keys = sorted({s.key for g in spec.groups.values() if g.name in perms for s in g.slots})
        for k in keys:
            total += float((ca.get(k).double() * permute_tensor(spec, k, cb.get(k), perms).double()).sum())
    return total


def run_one(lib: Path, tag: str, a: str, b: str, out_dir: Path, extra: list[str]) -> dict[str, Any]:
    result, out, perms = out_dir / f"{tag}.json", out_dir / f"{tag}.safetensors", out_dir / f"{tag}.perms.pt"
    env = {**os.environ, "PYTHONPATH": str(lib)}
    cmd = [sys.executable, __file__, a, b, "--out-dir", str(out_dir), "--worker", tag, *extra]
    from benchmarks.worker_process import measured, output_sha256  # the parent's import: a worker sees `lib` only

    load0 = os.getloadavg()[0]
    usage = measured(cmd, out_dir, env, f"{tag} with {lib}")
    rec = json.loads(result.read_text())
    rec.update(lib=str(lib), **usage, load=(load0, os.getloadavg()[0]), sha256=output_sha256(out), perms=str(perms))
    out.unlink()
    result.unlink()
    return rec


def machine() -> str:
    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    return f"{cpu}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--out-dir", type=Path, required=True, help="where outputs and permutations go (deleted)")
    p.add_argument("--runs", type=int, default=1, help="rounds of all versions")
    p.add_argument("--lib", type=Path, nargs="+", default=[Path(__file__).resolve().parent.parent],
                   help="versions of lib_rebasin to compare (folders holding lib_rebasin/)")
    p.add_argument("--max-sweeps", type=int, default=None)
    p.add_argument("--tolerance", type=float, default=None)
    p.add_argument("--json", type=Path, default=None, help="also write every run's record here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--objective", default=None, help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    ns.out_dir.mkdir(parents=True, exist_ok=True)
    options = {k: v for k, v in (("max_sweeps", ns.max_sweeps), ("tolerance", ns.tolerance)) if v is not None}
    extra = [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    if ns.worker:
        d = ns.out_dir
        worker(ns.a, ns.b, str(d / f"{ns.worker}.safetensors"), str(d / f"{ns.worker}.json"),
               str(d / f"{ns.worker}.perms.pt"), options)
        return 0
    if ns.objective:
        print(repr(objective(ns.a, ns.b, ns.objective)))
        return 0
    print("command: python -m benchmarks.independent " + shlex.join(argv if argv is not None else sys.argv[1:]))
    print(f"machine: {machine()}; date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
          f"load average at start {os.getloadavg()}", flush=True)
    runs = []
    for i in range(ns.runs):
        for j, lib in enumerate(ns.lib):
            rec = run_one(lib.resolve(), f"v{j}_r{i}", ns.a, ns.b, ns.out_dir, extra)
            runs.append(rec)
            ph = " ".join(f"{k} {v:.1f}" for k, v in rec["phases"].items())
            st = " ".join(f"{k} {v:.1f}" for k, v in rec["stages"].items())
            print(f"{lib.name:>12} run {i + 1}: wall {rec['wall']:.1f} s, CPU {rec['cpu']:.1f} s (user "
                  f"{rec['user']:.1f}, sys {rec['sys']:.1f}), peak RSS {rec['rss_gb']:.2f} GB | stages {st} | "
                  f"matching: {ph} | sweeps {rec['sweeps']}, solves {rec['solves']} | load "
                  f"{rec['load'][0]:.1f}->{rec['load'][1]:.1f} | {rec['sha256'][:16]}", flush=True)
    import torch
    first = torch.load(runs[0]["perms"])
    for rec in runs:
        other = torch.load(rec["perms"])
        rec["same_perms"] = other.keys() == first.keys() and all(torch.equal(first[k], other[k]) for k in first)
    if not all(r["same_perms"] for r in runs):
        for rec in runs:
            out = subprocess.run([sys.executable, __file__, ns.a, ns.b, "--out-dir", str(ns.out_dir),
                                  "--objective", rec["perms"]], env={**os.environ, "PYTHONPATH": rec["lib"]},
                                 capture_output=True, text=True, check=True)
            rec["objective"] = float(out.stdout.strip())
    for lib in ns.lib:
        mine = [r for r in runs if r["lib"] == str(lib.resolve())]
        def mean(k: str, mine: list[dict[str, Any]] = mine) -> float:
            return sum(r[k] for r in mine) / len(mine)
        obj = {r.get("objective") for r in mine} - {None}
        print(f"{lib}: wall {mean('wall'):.1f} s, CPU {mean('cpu'):.1f} s, peak RSS "
              f"{max(r['rss_gb'] for r in mine):.2f} GB; same permutations as the first run: "
              f"{all(r['same_perms'] for r in mine)}" + (f"; objective {sorted(obj)}" if obj else "")
              + f"; sha256 {sorted({r['sha256'][:16] for r in mine})}")
    for rec in runs:
        Path(rec["perms"]).unlink(missing_ok=True)
    if ns.json:
        ns.json.write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
