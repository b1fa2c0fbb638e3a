"""Measure post-merge levers on the benchmark's cached models: REPAIR (repair_lever.py) on top of the weighted sum,
weight-matching re-basin and activation matching, on the independent pairs and the same-base family.

    python -m benchmarks.quality.levers --data bench_data/quality --out benchmarks/quality/results/levers.json

Models must already be trained (this never trains). Each pair's result is written to the JSON as soon as it is
measured, so a long run can be stopped and resumed (pairs already in the file are skipped).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from .evaluate import Model, eval_set, heldout_loss
from .export import single_file
from .families import FULL, independent_pair, same_base_family
from .merging import aligned, merge
from .method_lines import ACTIVATIONS, REBASIN, WEIGHTED_SUM
from .repair_lever import SITES, calibration, collapse_profile, corrected, site_names, site_stats
from .train import cached

BASES = (WEIGHTED_SUM, REBASIN, ACTIVATIONS)
PAIRS = {  # name -> (width, steps); None = the same-base family's two fine-tunes
    "w32 s200": (32, 200), "w32 s100": (32, 100), "w32 s400": (32, 400), "w64 s100": (64, 100),
    "w96 s100": (96, 100), "same-base w32": None,
}


def _kind(site: str) -> str:
    """A site's layer kind with its position removed, e.g. 'resnets.conv2', 'attn1.to_out.0'."""
    s = re.sub(r"^(down_blocks|up_blocks)\.\d+\.|^mid_block\.", "", site)
    s = re.sub(r"(attentions|resnets|transformer_blocks|downsamplers|upsamplers)\.\d+\.", r"\1.", s)
    return s.replace("attentions.transformer_blocks.", "")


def _pair(root: Path, name: str):
    spec = PAIRS[name]
    cfgs = same_base_family(FULL, 32)[1:] if spec is None else independent_pair(FULL, spec[0], spec[1])
    models = [cached(root, c) for c in cfgs]
    if None in models:
        raise SystemExit(f"{name}: a model is not in {root}/models (train it with python -m benchmarks.quality)")
    return (32 if spec is None else spec[0]), models


def aligned_b(a: Path, b: Path, base, work: Path) -> Path:
    """B in A's basin as the base method sees it, as a file: B itself (weighted sum), weight matching's pi(B) (the
    core's re-basin merge at alpha 1) or activation matching's (the benchmark run's file when it is cached)."""
    if base.align == "activations":
        # The benchmark run leaves it in the same DATA/work folder (`run.py`); recomputed if absent.
        cached_files = sorted(work.glob(f"{b.stem}-aligned-to-{a.stem}-activations*.safetensors"),
                              key=lambda f: f.stat().st_mtime)
        return cached_files[-1] if cached_files else aligned(a, b, "activations", work)[0]
    if base.method == "rebasin":
        out = work / f"{b.stem}-aligned-to-{a.stem}-weights.safetensors"
        if not out.exists():
            from safetensors.torch import save_file

            tmp = out.with_suffix(".tmp")
            save_file(merge(a, b, base, 1.0, work).ldm, str(tmp))
            os.replace(tmp, out)
        return out
    return b


def measure(root: Path, name: str, alphas: tuple[float, ...], sites: list[str], cal, es, work: Path,
            log, done: dict) -> dict:
    """One pair: every base method (skipping those in `done`) with and without each REPAIR variant."""
    width, (ta, tb) = _pair(root, name)
    a, b = single_file(ta), single_file(tb)
    ldm_a = load_file(str(a))
    names = site_names(Model(width, ldm_a).unet, "all")
    la, lb = (heldout_loss(Model(width, load_file(str(p))), es)["mean"] for p in (a, b))
    out = {"width": width, "loss_a": la, "loss_b": lb, "methods": {}, "collapse": {}, "aligned_check": {},
           "seconds": {}, **done}
    sa = site_stats(width, ldm_a, names, cal)
    for base in BASES:
        if base.label in out["methods"]:
            continue
        t0 = time.perf_counter()
        b_aligned = aligned_b(a, b, base, work)
        ldm_b = load_file(str(b_aligned))
        sb = site_stats(width, ldm_b, names, cal)
        rows: dict = {}
        for alpha in alphas:
            # The merge of A and the aligned B, through the core API (for re-basin: exactly its merge at alpha).
            m = merge(a, b_aligned, WEIGHTED_SUM, alpha, work).ldm
            if alpha == 0.5:
                prof = collapse_profile(sa, sb, site_stats(width, m, names, cal), alpha)
                by_kind: dict[str, list[float]] = {}
                for site, r in prof.items():
                    by_kind.setdefault(_kind(site), []).append(r)
                out["collapse"][base.label] = {"sites": prof, "kinds": {k: [sum(v) / len(v), min(v), max(v)]
                                                                        for k, v in sorted(by_kind.items())}}
                if base.method == "rebasin":
                    # pi(B) must be the one the core's re-basin merge uses: its merge at 0.5 equals this one.
                    core = merge(a, b, base, alpha, work).ldm
                    out["aligned_check"][base.label] = max(float((core[k] - m[k]).abs().max()) for k in m)
            rows.setdefault("none", {})[str(alpha)] = heldout_loss(Model(width, m), es)["mean"]
            for where in sites:
                fixed, _ = corrected(width, sa, sb, m, alpha, where, cal)
                rows.setdefault(where, {})[str(alpha)] = heldout_loss(Model(width, fixed), es)["mean"]
        for where, curve in rows.items():
            curve["barrier"] = curve["0.5"] - (la + lb) / 2
        out["methods"][base.label] = rows
        out["seconds"][base.label] = time.perf_counter() - t0
        log(f"{name} {base.label}: barrier " + ", ".join(f"{w} {c['barrier']:+.4f}" for w, c in rows.items()),
            out)
    out["measured"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    out["load_average_end"] = os.getloadavg()[0]
    return out


def render(results: dict) -> str:
    """The measured tables, in Markdown (barrier at alpha 0.5, the curves, and where the merge's std collapses)."""
    lines = []
    for name, pair in results.get("pairs", {}).items():
        lines += [f"### {name} (parents' held-out loss {pair['loss_a']:.4f} / {pair['loss_b']:.4f}; "
                  f"measured {pair.get('measured', 'partly')})", ""]
        variants = [v for v in ("none", *SITES) if any(v in r for r in pair["methods"].values())]
        lines += ["| method | " + " | ".join(f"barrier, REPAIR {v}" if v != "none" else "barrier, no REPAIR"
                                            for v in variants) + " |",
                  "| --- |" + " ---: |" * len(variants)]
        for label, rows in pair["methods"].items():
            lines.append(f"| {label} | " + " | ".join(f"{rows[v]['barrier']:+.4f}" if v in rows else ""
                                                    for v in variants) + " |")
        curves = [(label, v, c) for label, rows in pair["methods"].items() for v, c in rows.items() if "0.25" in c]
        if curves:
            lines += ["", "Held-out loss over alpha (parents at 0 and 1):", "",
                      "| method | REPAIR | a=0.25 | a=0.5 | a=0.75 |", "| --- | --- | ---: | ---: | ---: |"]
            lines += [f"| {label} | {v} | {c['0.25']:.4f} | {c['0.5']:.4f} | {c['0.75']:.4f} |"
                      for label, v, c in curves]
        kinds = sorted({k for c in pair["collapse"].values() for k in c["kinds"]})
        labels = list(pair["collapse"])
        lines += ["", "std of the merge at alpha 0.5 / interpolated parents' std, per layer kind (mean over "
                      "layers of the mean over channels; min-max over layers):", "",
                  "| layer kind | " + " | ".join(labels) + " |", "| --- |" + " ---: |" * len(labels)]
        for k in kinds:
            cells = []
            for label in labels:
                mean, lo, hi = pair["collapse"][label]["kinds"][k]
                cells.append(f"{mean:.3f} ({lo:.2f}-{hi:.2f})")
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.quality.levers")
    ap.add_argument("--data", type=Path, default=Path("bench_data/quality"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/quality/results/levers.json"))
    ap.add_argument("--pairs", nargs="*", default=list(PAIRS), choices=list(PAIRS))
    ap.add_argument("--curve", nargs="*", default=["w32 s200"], choices=list(PAIRS),
                    help="pairs measured at alpha 0.25 and 0.75 too")
    ap.add_argument("--sites", nargs="*", default=list(SITES), choices=list(SITES))
    ap.add_argument("--calibration-images", type=int, default=32,
                    help="training images (each at 5 timesteps) the statistics are measured on")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--report", action="store_true", help="print the Markdown tables of --out and exit")
    args = ap.parse_args(argv)
    if args.report:
        print(render(json.loads(args.out.read_text())))
        return 0
    torch.set_num_threads(args.threads)
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    results.setdefault("machine", {"cpu_count": os.cpu_count(), "torch": torch.__version__,
                                   "threads": args.threads, "load_average_start": os.getloadavg()[0]})
    cal, es = calibration(args.calibration_images), eval_set(FULL.eval_images)
    work = args.data / "work"
    def save() -> None:
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        os.replace(tmp, args.out)

    for name in args.pairs:
        pairs = results.setdefault("pairs", {})
        if "measured" in pairs.get(name, {}):
            print(f"{name}: already measured ({pairs[name]['measured']})")
            continue
        alphas = (0.25, 0.5, 0.75) if name in args.curve else (0.5,)

        def log(line: str, partial: dict, name: str = name) -> None:
            print(line, flush=True)
            pairs[name] = partial  # each base method is saved as soon as it is measured
            save()

        pairs[name] = measure(args.data, name, alphas, args.sites, cal, es, work, log, pairs.get(name, {}))
        save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
