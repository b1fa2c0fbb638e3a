"""Benchmark harness (issue 5): our merges vs sd-meh and ogkalu2 on synthetic full-size SD 1.5 fp16 pairs.

    python -m benchmarks.run [--scale full|mini] [--data DIR] [--cases ...] [--pairs X Y] [--repeat N]
                             [--device cpu|cuda] [--ogkalu2-dir DIR] [--ogkalu2-default] [--out results.md]

Pairs (generated once into DATA/<scale>/, reused when their header says they were made with the same recipe):
  X = independent models (seeds 1 and 2); Y = same base (seeds 11 and 12 on base 1, delta 0.05).
Every case runs in a fresh process (`python -m benchmarks.cases`); its peak RSS comes from wait4() on that process,
so it is the case's own. The load average is sampled every 2 s while a case runs and reported next to it: on a
shared 2-core machine a figure taken at load > ~1.5 is not reliable (`--max-load` waits for a quiet machine first).
Raw JSON per run and the cases' logs go to DATA/raw/<timestamp>/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .cases import CASES

PAIRS = {
    "X": ("independent", dict(seed=1), dict(seed=2)),
    "Y": ("same-base", dict(seed=11, base_seed=1, delta=0.05), dict(seed=12, base_seed=1, delta=0.05)),
}
# Which pairs each case runs on by default.
DEFAULT_PAIRS = {
    "ours_rebasin": ("Y", "X"),
    "ours_weighted_sum": ("X",),
    "ours_read": ("Y",),
    "ours_legacy": ("X",),
    "ours_rebasin_1sweep": ("X",),
    "ours_rebasin_tol": ("X",),
    "ours_activations": ("X",),
    "ours_weighted_sum_repair": ("X",),
    "ours_activations_repair": ("X",),
    "sdmeh_rebasin": ("Y", "X"),
    "ogkalu2_1sweep": ("X",),
    "ogkalu2_default": ("X",),
}
DEFAULT_CASES = ["ours_rebasin", "ours_weighted_sum", "ours_legacy", "sdmeh_rebasin", "ogkalu2_1sweep"]
LABELS = {
    "ours_rebasin": "ours: re-basin (UNet + TE)",
    "ours_weighted_sum": "ours: weighted sum",
    "ours_read": "ours: read every tensor of A and B, 2 passes",
    "ours_legacy": "ours: legacy (500 iterations)",
    "ours_rebasin_1sweep": "ours: re-basin (UNet + TE), max_sweeps=1",
    "ours_rebasin_tol": "ours: re-basin (UNet + TE), tolerance 0.01",
    "ours_activations": "ours: re-basin (UNet + TE), activation matching, 4 prompts",
    "ours_weighted_sum_repair": "ours: weighted sum + REPAIR, 4 prompts",
    "ours_activations_repair": "ours: re-basin (UNet + TE), activation matching + REPAIR, 4 prompts",
    "sdmeh_rebasin": "sd-meh 0.9.5: re-basin merge + save",
    "ogkalu2_1sweep": "ogkalu2: weight_matching, all groups, max_iter=1",
    "ogkalu2_default": "ogkalu2: weight_matching, all groups, default max_iter=3",
}
REPO = Path(__file__).resolve().parent.parent


# -- inputs ----------------------------------------------------------------------------------------------------

def _recipe(scale: str, kw: dict[str, Any]) -> str:
    from lib_rebasin.sd1.synthetic import SCALES
    return (f"seed={kw['seed']} base_seed={kw.get('base_seed')} delta={kw.get('delta', 0.05)} "
            f"{SCALES[scale].describe()}")


def _header_recipe(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            return json.loads(f.read(n)).get("__metadata__", {}).get("lib_rebasin_synthetic")
    except (OSError, ValueError):
        return None


def ensure_pair(data: Path, scale: str, pair: str) -> tuple[Path, Path]:
    """The pair's two files, generated (in a subprocess, streamed key by key) unless already there."""
    folder = data / scale
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for side, kw in zip("ab", PAIRS[pair][1:]):
        path = folder / f"{pair}_{side}.safetensors"
        want = _recipe(scale, kw)
        if _header_recipe(path) != want:
            print(f"generating {path} ({want})", flush=True)
            code = ("import sys; from lib_rebasin.sd1.synthetic import make_checkpoint; "
                    f"make_checkpoint(sys.argv[1], {scale!r}, precision='fp16', overwrite=True, **{kw!r})")
            subprocess.run([sys.executable, "-c", code, str(path)], check=True, cwd=REPO)
        paths.append(path)
    return paths[0], paths[1]


# -- machine ---------------------------------------------------------------------------------------------------

def lib_state() -> str:
    """The lib_rebasin commit the cases import, with any uncommitted files under lib_rebasin/."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        lines = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "lib_rebasin"],
                               capture_output=True, text=True, check=True).stdout.split("\n")
        dirty = [line[3:] for line in lines if line.strip()]
        return head + (f" + uncommitted changes in {', '.join(dirty)}" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> dict[str, Any]:
    import scipy
    import torch
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem = next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal"))
        ram_gb = int(mem.split()[1]) / 2**20
    except (OSError, StopIteration):
        ram_gb = float("nan")
    info = {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": ram_gb, "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "scipy": scipy.__version__,
            "os": platform.platform()}
    info["lib_rebasin"] = lib_state()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        from importlib.metadata import version
        info["sd-meh"] = version("sd-meh")
    except Exception:
        info["sd-meh"] = "not installed"
    return info


class LoadSampler:
    """Samples the 1-minute load average every `period` s while a case runs."""

    def __init__(self, period: float = 2.0) -> None:
        self.samples: list[float] = []
        self.period = period
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(os.getloadavg()[0])
            self._stop.wait(self.period)

    def __enter__(self) -> "LoadSampler":
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


def wait_for_quiet(max_load: float, timeout: float) -> float:
    """Wait (up to `timeout` s) until the 1-minute load average is at most `max_load`; return it."""
    deadline = time.monotonic() + timeout
    while True:
        load = os.getloadavg()[0]
        if load <= max_load or time.monotonic() >= deadline:
            return load
        print(f"  load {load:.2f} > {max_load}; waiting", flush=True)
        time.sleep(15)


# -- running ---------------------------------------------------------------------------------------------------

def run_case(case: str, a: Path, b: Path, raw: Path, tag: str, args: argparse.Namespace) -> dict[str, Any]:
    result = raw / f"{tag}.json"
    cmd = [sys.executable, "-m", "benchmarks.cases", case, str(a), str(b), str(result), "--device", args.device,
           "--out-dir", str(args.data / "out")]
    if args.ogkalu2_dir:
        cmd += ["--ogkalu2-dir", str(args.ogkalu2_dir)]
    if args.profile:
        cmd += ["--profile", str(raw / f"{tag}.pstats")]
    load_before = os.getloadavg()[0]
    state = lib_state()
    with open(raw / f"{tag}.log", "w") as log, LoadSampler() as sampler:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        timer = None
        if args.timeout:
            timer = threading.Timer(args.timeout, proc.kill)  # the worker's own process, by its pid
            timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        if timer is not None:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
    try:
        rec = json.loads(result.read_text())
    except (OSError, ValueError):
        why = (f"killed at the --timeout of {args.timeout:g} s" if args.timeout and wall >= args.timeout
               else f"worker exited {proc.returncode} without a result; see {tag}.log")
        rec = {"available": True, "error": why}
    rec.update({"case": case, "wall_process_s": wall, "peak_rss_gb": usage.ru_maxrss / 2**20,
                "cpu_process_s": usage.ru_utime + usage.ru_stime,
                "load_before": load_before, "load_max": max(sampler.samples or [load_before]),
                "load_mean": statistics.fmean(sampler.samples or [load_before]), "cmd": shlex.join(cmd),
                "lib_rebasin": state})
    result.write_text(json.dumps(rec, indent=1, default=str))
    return rec


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "—" if x is None else format(x, spec)


def summarize(case: str, pair: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if r.get("available") and "error" not in r]
    first = ok[0] if ok else runs[0]
    row: dict[str, Any] = {"case": case, "pair": pair, "runs": len(runs)}
    if not first.get("available", True):
        row["notes"] = "n/a: " + first.get("reason", "")
        return row
    if not ok:
        row["notes"] = "error: " + first.get("error", "?")
        return row
    row["wall"] = statistics.median(r["seconds"] for r in ok)
    row["walls"] = [r["seconds"] for r in ok]
    row["rss"] = max(r["peak_rss_gb"] for r in ok)
    sampled = [r["sampled_peak_gb"] for r in ok if r.get("sampled_peak_gb")]
    if sampled:
        row["rss_anon"] = max(s["RssAnon"] for s in sampled)
        row["rss_file"] = max(s["RssFile"] for s in sampled)
    row["vram"] = max((r["peak_vram_gb"] for r in ok if r.get("peak_vram_gb") is not None), default=None)
    row["load"] = max(r["load_max"] for r in ok)
    row["load_mean"] = statistics.fmean(r["load_mean"] for r in ok)
    sweeps = first.get("sweeps")
    row["sweeps"] = "—" if sweeps is None else "+".join(str(s) for s in sweeps)
    if first.get("moved") is not None:
        row["moved"] = f"{first['moved']:,} / {first['units']:,}" if first.get("units") else f"{first['moved']:,}"
    if first.get("gain") is not None:
        rel = first.get("gain_rel")
        row["gain"] = f"{first['gain']:+,.1f}" + (f" ({100 * rel:+.2f}%)" if rel is not None else "")
        if first.get("cos"):
            row["gain"] += f", cos {first['cos'][0]:.4f}→{first['cos'][1]:.4f}"
    notes = list(first.get("notes", []))
    # CPU time of the whole worker process (user + system, all threads): on a shared machine it moves much less
    # with other load than wall time does.
    notes.append("process CPU s: " + ", ".join(f"{r['cpu_process_s']:.1f}" for r in ok if "cpu_process_s" in r))
    if case.startswith("ours_"):
        notes.append(f"lib_rebasin {first.get('lib_rebasin', '?')}")
    if len(ok) > 1:
        notes.append("runs: " + ", ".join(f"{w:.1f}" for w in row["walls"]))
    row["notes"] = "; ".join(n for n in notes if n)
    return row


def table(rows: list[dict[str, Any]], device: str) -> str:
    vram = device.startswith("cuda")
    head = ["case", "pair", "wall s (median)", "peak RSS GB (anon / file)"] + (["peak VRAM GB"] if vram else []) + [
        "sweeps", "units moved", "objective gain", "load avg (max / mean)", "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [LABELS.get(r["case"], r["case"]), f"{r['pair']} ({PAIRS[r['pair']][0]})",
                 _fmt(r.get("wall")), _fmt(r.get("rss"), ".2f")
                 + (f" ({r['rss_anon']:.2f} / {r['rss_file']:.2f})" if "rss_anon" in r else "")]
        if vram:
            cells.append(_fmt(r.get("vram"), ".2f"))
        cells += [r.get("sweeps", "—"), r.get("moved", "—"), r.get("gain", "—"),
                  f"{r['load']:.2f} / {r['load_mean']:.2f}" if "load" in r else "—",
                  r.get("notes", "").replace("|", "/")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def render(rows: list[dict[str, Any]], info: dict[str, Any], args: argparse.Namespace, argv: list[str],
           started: str, extra: dict[str, Any]) -> str:
    m = info
    out = [f"## Benchmark run {started} (scale: {args.scale}, device: {args.device})", "",
           f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gb']:.1f} GB RAM"
           + (f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU")
           + f"; Python {m['python']}, torch {m['torch']} ({m['torch_threads']} threads), scipy {m['scipy']}, "
             f"sd-meh {m['sd-meh']}" + (f"; ogkalu2 @ {extra['ogkalu2_commit']}" if extra.get("ogkalu2_commit")
                                       else "") + ".",
           f"lib_rebasin: {m['lib_rebasin']}.",
           f"Command: `python -m benchmarks.run {shlex.join(argv)}`", "",
           table(rows, args.device), ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=("full", "mini"), default="full")
    p.add_argument("--data", type=Path, default=Path(os.environ.get("BENCH_DATA", "bench_data")),
                   help="folder for the synthetic pairs, raw outputs and temporary merges (outside the repo)")
    p.add_argument("--cases", nargs="+", choices=sorted(CASES), default=None,
                   help=f"default: {' '.join(DEFAULT_CASES)} (+ ogkalu2_default with --ogkalu2-default)")
    p.add_argument("--pairs", nargs="+", choices=sorted(PAIRS), default=None,
                   help="restrict to these pairs (default: each case's own, see DEFAULT_PAIRS; a case that has "
                        "none of them runs on these)")
    p.add_argument("--repeat", type=int, default=1, help="runs per case; the table shows the median wall time")
    p.add_argument("--device", default="cpu")
    p.add_argument("--ogkalu2-dir", type=Path, default=os.environ.get("OGKALU2_DIR"),
                   help="a checkout of ogkalu2/Merge-Stable-Diffusion-models-without-distortion (outside the "
                        "repo); the ogkalu2 cases are skipped with a note without it")
    p.add_argument("--ogkalu2-default", action="store_true",
                   help="also run ogkalu2's default 3-sweep matching (~25 min on 2 cores at full scale)")
    p.add_argument("--max-load", type=float, default=None,
                   help="before each run, wait until the 1-minute load average is at most this")
    p.add_argument("--max-wait", type=float, default=900, help="longest wait for --max-load, seconds")
    p.add_argument("--timeout", type=float, default=None, help="kill a case after this many seconds")
    p.add_argument("--profile", action="store_true", help="cProfile each case (pstats files in the raw folder)")
    p.add_argument("--out", type=Path, default=None, help="write the Markdown table here (else stdout only)")
    p.add_argument("--append", action="store_true", help="append to --out instead of replacing it")
    args = p.parse_args(argv)
    args.data = args.data.resolve()
    if args.ogkalu2_dir:
        args.ogkalu2_dir = Path(args.ogkalu2_dir).resolve()

    cases = args.cases or DEFAULT_CASES + (["ogkalu2_default"] if args.ogkalu2_default else [])
    started = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    raw = args.data / "raw" / dt.datetime.now().strftime(f"%Y%m%d-%H%M%S-{args.scale}")
    raw.mkdir(parents=True, exist_ok=True)
    info = machine()
    extra: dict[str, Any] = {}
    rows = []
    for case in cases:
        # --pairs restricts each case to those of its own pairs; a case with none of them runs on the given ones.
        pairs = [q for q in DEFAULT_PAIRS[case] if args.pairs is None or q in args.pairs] or list(args.pairs or [])
        for pair in pairs:
            a, b = ensure_pair(args.data, args.scale, pair)
            runs = []
            for rep in range(args.repeat):
                if args.max_load is not None:
                    wait_for_quiet(args.max_load, args.max_wait)
                tag = f"{case}_{pair}_{rep}"
                print(f"{tag}: running (load {os.getloadavg()[0]:.2f})", flush=True)
                rec = run_case(case, a, b, raw, tag, args)
                runs.append(rec)
                if rec.get("commit"):
                    extra["ogkalu2_commit"] = rec["commit"]
                state = ("n/a: " + rec.get("reason", "")) if not rec.get("available", True) else (
                    "error: " + rec["error"] if "error" in rec else
                    f"{rec['seconds']:.1f} s, peak RSS {rec['peak_rss_gb']:.2f} GB, load max {rec['load_max']:.2f}")
                print(f"{tag}: {state}", flush=True)
                if not rec.get("available", True) or "error" in rec:
                    break
            rows.append(summarize(case, pair, runs))
    md = render(rows, info, args, argv, started, extra)
    (raw / "results.md").write_text(md)
    (raw / "machine.json").write_text(json.dumps({**info, **extra}, indent=1))
    print(md)
    if args.out:
        if args.append and args.out.exists():
            args.out.write_text(args.out.read_text().rstrip("\n") + "\n\n" + md)
        else:
            args.out.write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
