"""One benchmark case, run in its own process so that its peak RSS is its own.

    python -m benchmarks.cases CASE A.safetensors B.safetensors RESULT.json [--device cpu] [--out-dir DIR]
                               [--ogkalu2-dir DIR] [--profile PSTATS]

Prints nothing useful; writes one JSON object to RESULT.json:
    seconds   wall time of the measured section (see each case)
    sweeps, moved, units, gain, gain_rel, cos  (None where they do not apply)
    available (False + reason when the case cannot run here), notes (list of strings), extra details.
The driver (`benchmarks.run`) adds the process's peak RSS from wait4().

The anchors are instrumented only from the outside (wrapping functions they import), never edited or copied.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch


class Unavailable(Exception):
    """The case cannot run in this build / environment (reported in the table, not a failure of the harness)."""


class RssSampler:
    """Peak anonymous and file-backed RSS of this process (/proc/self/status, sampled every 0.1 s).

    wait4()'s peak RSS counts the pages of memory-mapped input files that were touched; this splits the two, so
    a memory target can be read as "private memory" (RssAnon) vs page cache mapped in (RssFile)."""

    def __init__(self, period: float = 0.1) -> None:
        import threading
        self.peak = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
        self.period = period
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                name, _, rest = line.partition(":")
                if name in self.peak:
                    self.peak[name] = max(self.peak[name], int(rest.split()[0]))
        except (OSError, ValueError, IndexError):
            pass

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.period)

    def __enter__(self) -> "RssSampler":
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.sample()

    def gb(self) -> dict[str, float]:
        return {k: v / 2**20 for k, v in self.peak.items()}


def _peak_vram(device: str) -> float | None:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return None


# -- ours ------------------------------------------------------------------------------------------------------

OURS = {
    "ours_rebasin": dict(method="rebasin", iterations=1),
    "ours_weighted_sum": dict(method="weighted_sum", iterations=1),
    "ours_legacy": dict(method="legacy", iterations=500),
    # Stopped early: one sweep (like for like with ogkalu2's max_iter=1), and the 1 % tolerance rule.
    "ours_rebasin_1sweep": dict(method="rebasin", iterations=1, max_sweeps=1),
    "ours_rebasin_tol": dict(method="rebasin", iterations=1, tolerance=0.01),
    # Activation matching (the default 4 prompts x 5 DDIM steps at 16x16 latents); the VAE is not merged here.
    "ours_activations": dict(method="rebasin", iterations=1, matching="activations"),
    # REPAIR after a weighted sum (its own cost: trajectory + 3 statistics passes over 40 inputs at 16x16) and
    # after activation matching (what the quality benchmark found best).
    "ours_weighted_sum_repair": dict(method="weighted_sum", iterations=1, repair=True),
    "ours_activations_repair": dict(method="rebasin", iterations=1, matching="activations", repair=True),
}


def run_ours(case: str, a: str, b: str, out_dir: Path, device: str) -> dict[str, Any]:
    from lib_rebasin.errors import RebasinError
    from lib_rebasin.options import MergeOptions
    from lib_rebasin.merge.run import merge_checkpoints

    kw = OURS[case]
    opts = MergeOptions(alpha=0.5, parts=("unet", "te"), device=device, precision="fp16", **kw)
    out = out_dir / f"{case}.safetensors"
    stages: dict[str, float] = {}
    t0 = time.perf_counter()

    def progress(ev: Any) -> None:
        stages.setdefault(ev.stage, time.perf_counter() - t0)

    try:
        try:
            result = merge_checkpoints(a, b, out, opts, overwrite=True, progress=progress)
        except RebasinError as e:
            if kw["method"] == "legacy" and ("not available" in str(e) or "not implemented" in str(e).lower()):
                raise Unavailable(f"legacy mode: {e}") from e
            raise
        seconds = time.perf_counter() - t0
    finally:
        out.unlink(missing_ok=True)
    d = result.diagnostics
    rec: dict[str, Any] = {"seconds": seconds, "options": {k: v for k, v in vars(opts).items()},
                           "diagnostics": d.to_dict(), "summary": d.summary_lines(), "notes": []}
    # Stage split from the first progress event of each stage (loading -> matching -> hashing -> writing).
    order = sorted(stages.items(), key=lambda kv: kv[1])
    split = {}
    for i, (name, t) in enumerate(order):
        end = order[i + 1][1] if i + 1 < len(order) else seconds
        split[name] = split.get(name, 0.0) + end - t
    rec["stages"] = split
    rec["notes"].append(", ".join(f"{k} {v:.1f} s" for k, v in split.items() if v >= 0.05))
    if d.matched:
        rec["sweeps"] = list(d.sweeps)
        rec["moved"] = sum(m for m, _ in d.moved.values())
        rec["units"] = sum(n for _, n in d.moved.values())
        if d.objective:
            before = sum(o[0] for o in d.objective.values())
            after = sum(o[1] for o in d.objective.values())
            na = sum(o[2] for o in d.objective.values()) ** 0.5
            nb = sum(o[3] for o in d.objective.values()) ** 0.5
            rec["gain"] = after - before
            rec["gain_rel"] = (after - before) / abs(before) if before else None
            rec["cos"] = [before / (na * nb), after / (na * nb)] if na and nb else None
        rec["notes"].append(f"{d.solves} solves, {d.certified} certified")
    return rec


def run_read(a: str, b: str) -> dict[str, Any]:
    """Read throughput of the checkpoint reader: every tensor of both files, twice, each widened to fp32 as a
    merge consumes it (so the mmap path's page faults and the positional-read path's copies are both paid).
    The first pass may find the files in the page cache or not; the second almost always does."""
    from lib_rebasin.io.checkpoint import open_checkpoint

    passes, cpu = [], []
    total = 0
    for _ in range(2):
        t0, c0 = time.perf_counter(), time.process_time()
        total = 0
        for path in (a, b):
            with open_checkpoint(path) as ck:
                for key in ck.keys():
                    t = ck.get(key)
                    total += t.numel() * t.element_size()
                    t.to(torch.float32)
        passes.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    seconds = sum(passes)
    notes = [f"{total / 2**30:.2f} GiB per pass; passes " + ", ".join(
        f"{s:.2f} s wall / {c:.2f} s CPU ({total / s / 2**30:.2f} GiB/s)" for s, c in zip(passes, cpu))]
    return {"seconds": seconds, "passes": passes, "cpu": cpu, "bytes": total, "notes": notes}


# -- sd-meh ----------------------------------------------------------------------------------------------------

def run_sdmeh(a: str, b: str, out_dir: Path, device: str) -> dict[str, Any]:
    try:
        import sd_meh
        import sd_meh.merge as meh_merge
        from sd_meh.utils import weights_and_bases
    except ImportError as e:
        raise Unavailable(f"sd-meh not installed ({e}); pip install sd-meh --no-deps tensordict") from e
    from importlib.metadata import version

    calls: list[dict[str, Any]] = []
    original = meh_merge.weight_matching

    def counted(ps: Any, params_a: Any, params_b: Any, *args: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        perm, avg = original(ps, params_a, params_b, *args, **kw)
        moved = sum(int((p.long() != torch.arange(len(p))).sum()) for p in perm.values())
        units = sum(len(p) for p in perm.values())
        calls.append({"max_iter": kw.get("max_iter"), "seconds": time.perf_counter() - t, "moved": moved,
                      "units": units, "average": float(avg)})
        return perm, avg

    meh_merge.weight_matching = counted  # instrument from outside: the call site looks the name up at run time
    # What its CLI does for `merge_models.py -a A -b B -m weighted_sum -ba 0.5 -rb -rbi 1 -p 16`:
    weights, bases = weights_and_bases("weighted_sum", None, 0.5, None, None, None, None, None, None, 0.0, 0.0)
    out = out_dir / "sdmeh_rebasin"
    t0 = time.perf_counter()
    try:
        merged = meh_merge.merge_models({"model_a": a, "model_b": b}, weights, bases, "weighted_sum",
                                        precision=16, weights_clip=False, re_basin=True, iterations=1,
                                        device=device, work_device=device, prune=False, threads=1)
        t_merge = time.perf_counter() - t0
        meh_merge.save_model(merged, str(out), "safetensors")
        seconds = time.perf_counter() - t0
    finally:
        Path(f"{out}.safetensors").unlink(missing_ok=True)
    notes = [f"merge {t_merge:.1f} s, save {seconds - t_merge:.1f} s",
             "weight_matching calls: " + ", ".join(
                 f"max_iter={c['max_iter']} {c['seconds']:.2f} s moved {c['moved']}" for c in calls)]
    moved = sum(c["moved"] for c in calls)
    return {"seconds": seconds, "sweeps": [c["max_iter"] for c in calls], "moved": moved,
            "units": calls[0]["units"] if calls else None, "calls": calls, "notes": notes,
            "version": version("sd-meh"), "file": sd_meh.__file__}


# -- ogkalu2 ---------------------------------------------------------------------------------------------------

def _ogkalu2_import(dirname: str | None) -> tuple[Any, Any, str]:
    if not dirname or not (Path(dirname) / "weight_matching.py").is_file():
        raise Unavailable("ogkalu2 checkout not given (--ogkalu2-dir or OGKALU2_DIR): clone "
                          "ogkalu2/Merge-Stable-Diffusion-models-without-distortion outside the repo")
    sys.path.insert(0, str(Path(dirname).resolve()))
    import weight_matching as wm  # type: ignore[import-not-found]
    from merge_PermSpec_SD1UNet import sdunet_permutation_spec  # type: ignore[import-not-found]

    import subprocess
    try:
        commit = subprocess.run(["git", "-C", dirname, "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return wm, sdunet_permutation_spec, commit


def run_ogkalu2(a: str, b: str, device: str, dirname: str | None, max_iter: int) -> dict[str, Any]:
    """ogkalu2's `weight_matching(ps, A, B)` with all 519 groups (its default at HEAD), fp32 on CPU as its CLI
    forces there. Measured: the call itself. Then, outside the timing: sweeps, entries moved, and the objective
    sum_k <A_k, perm(B)_k> over its spec's permutable keys (float64)."""
    wm, make_spec, commit = _ogkalu2_import(dirname)
    from safetensors.torch import load_file

    ps = make_spec()
    t_load = time.perf_counter()
    params_a, params_b = load_file(a), load_file(b)
    t_load = time.perf_counter() - t_load

    # Count sweeps (the outer tqdm loop) and time the LAP solves, by wrapping the names its module looks up.
    sweeps = [0]
    lap = {"seconds": 0.0, "calls": 0}
    real_tqdm, real_lsa = wm.tqdm, wm.linear_sum_assignment

    def tqdm(it: Any, desc: str = "", **kw: Any) -> Any:
        if desc.startswith("weight_matching in"):
            def outer() -> Any:
                for x in it:
                    sweeps[0] += 1
                    yield x
            return outer()
        return it

    def lsa(*args: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        r = real_lsa(*args, **kw)
        lap["seconds"] += time.perf_counter() - t
        lap["calls"] += 1
        return r

    wm.tqdm, wm.linear_sum_assignment = tqdm, lsa
    random.seed(0)
    t0 = time.perf_counter()
    try:
        perm, _avg = wm.weight_matching(ps, params_a, params_b, device=device, max_iter=max_iter, usefp16=False)
    finally:
        wm.tqdm, wm.linear_sum_assignment = real_tqdm, real_lsa
    seconds = time.perf_counter() - t0

    moved = sum(int((p.long() != torch.arange(len(p))).sum()) for p in perm.values())
    units = sum(len(p) for p in perm.values())
    groups_moved = sum(1 for p in perm.values() if (p.long() != torch.arange(len(p))).any())
    before = after = 0.0
    for k in ps.axes_to_perm:
        if k not in params_a or k not in params_b or "model_" in k:
            continue
        if all(ax is None for ax in ps.axes_to_perm[k]):
            continue
        wa = params_a[k].double()
        before += float((wa * params_b[k].double()).sum())
        after += float((wa * wm.get_permuted_param(ps, perm, k, params_b).double()).sum())
    notes = [f"LAP {lap['seconds']:.1f} s ({100 * lap['seconds'] / max(seconds, 1e-9):.0f}%) over {lap['calls']} "
             f"solves; {groups_moved}/{len(perm)} groups moved; load {t_load:.1f} s (not timed)",
             f"commit {commit[:8]}"]
    return {"seconds": seconds, "sweeps": [sweeps[0]], "moved": moved, "units": units, "gain": after - before,
            "gain_rel": (after - before) / abs(before) if before else None, "objective": [before, after],
            "commit": commit, "max_iter": max_iter, "lap": lap, "groups_moved": groups_moved, "notes": notes}


# -- entry point -----------------------------------------------------------------------------------------------

CASES: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    **{name: (lambda ns, name=name: run_ours(name, ns.a, ns.b, Path(ns.out_dir), ns.device)) for name in OURS},
    "ours_read": lambda ns: run_read(ns.a, ns.b),
    "sdmeh_rebasin": lambda ns: run_sdmeh(ns.a, ns.b, Path(ns.out_dir), ns.device),
    "ogkalu2_1sweep": lambda ns: run_ogkalu2(ns.a, ns.b, ns.device, ns.ogkalu2_dir, max_iter=1),
    "ogkalu2_default": lambda ns: run_ogkalu2(ns.a, ns.b, ns.device, ns.ogkalu2_dir, max_iter=3),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("case", choices=sorted(CASES))
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("result")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out-dir", default=".")
    p.add_argument("--ogkalu2-dir", default=os.environ.get("OGKALU2_DIR"))
    p.add_argument("--profile", default=None, help="write cProfile stats of the case to this file")
    ns = p.parse_args(argv)
    Path(ns.out_dir).mkdir(parents=True, exist_ok=True)
    rec: dict[str, Any]
    t0 = time.perf_counter()
    rss = RssSampler()
    try:
        with rss:
            if ns.profile:
                import cProfile
                prof = cProfile.Profile()
                rec = prof.runcall(CASES[ns.case], ns)
                prof.dump_stats(ns.profile)
            else:
                rec = CASES[ns.case](ns)
        rec["available"] = True
    except Unavailable as e:
        rec = {"available": False, "reason": str(e)}
    except Exception as e:  # recorded in the table as an error; the driver goes on with the next case
        rec = {"available": True, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    rec["process_seconds"] = time.perf_counter() - t0
    rec["self_maxrss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    rec["peak_vram_gb"] = _peak_vram(ns.device)
    rec["sampled_peak_gb"] = rss.gb()  # RssAnon / RssFile / VmRSS, sampled (may miss a spike shorter than 0.1 s)
    rec["torch_threads"] = torch.get_num_threads()
    Path(ns.result).write_text(json.dumps(rec, indent=1, default=str))
    return 0 if "error" not in rec else 1


if __name__ == "__main__":
    sys.exit(main())
