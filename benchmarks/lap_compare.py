"""Linear assignment solvers on the cost matrices weight matching produces: scipy vs `lap` vs `lapjv`.

    python -m benchmarks.lap_compare [--data bench_data] [--sizes 320 640 1280 2560 5120] [--repeat 3]
                                     [--no-real] [--out lap_results.md]

Every solver maximises sum_i C[i, perm[i]] (the LAP libraries minimise, so they get -C). Checked against scipy's
optimum, in float64:
  - scipy.optimize.linear_sum_assignment(C, maximize=True)          -> (rows, cols), cols is row -> column
  - lap.lapjv(-C) (lap 0.5.x)                                        -> (cost, x, y): x is row -> column,
    y is column -> row (the map sd-webui-model-mixer applies by mistake: its objective is shown too)
  - lapjv.lapjv(-C) (lapjv 1.3.x), float32 by default and with force_doubles=True -> (row_ind, col_ind, _):
    row_ind is row -> column
Matrices: synthetic (random Gaussian; near-identity = Gaussian + 3 I, what a same-base pair looks like) for each
size, and, when the full-size synthetic pairs of `benchmarks.run` exist, real first-sweep cost matrices of a few
free groups (`lib_rebasin.align.weight_matching.cost_matrix`, identity permutations elsewhere) for the independent (X) and
same-base (Y) pairs, plus one GroupNorm-structured group solved the way `lib_rebasin.align.assignment.solve` does it
(1024 small blocks + one top-level solve) with each backend swapped in.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from scipy.optimize import linear_sum_assignment

Solver = Callable[[np.ndarray], np.ndarray]  # C (float64, maximise) -> perm (row -> column)


def _scipy(C: np.ndarray) -> np.ndarray:
    return linear_sum_assignment(C, maximize=True)[1]


def solvers() -> dict[str, Solver]:
    out: dict[str, Solver] = {"scipy": _scipy}
    try:
        import lap

        def lap_x(C: np.ndarray) -> np.ndarray:
            return lap.lapjv(-C)[1]
        out["lap.lapjv (x)"] = lap_x
    except ImportError:
        pass
    try:
        import lapjv

        def lapjv_f32(C: np.ndarray) -> np.ndarray:
            return lapjv.lapjv(-C)[0]

        def lapjv_f64(C: np.ndarray) -> np.ndarray:
            return lapjv.lapjv(-C, force_doubles=True)[0]
        out["lapjv f32"] = lapjv_f32
        out["lapjv f64"] = lapjv_f64
    except ImportError:
        pass
    return out


def value(C: np.ndarray, perm: np.ndarray) -> float:
    return float(C[np.arange(C.shape[0]), perm].sum())


def timed(fn: Solver, C: np.ndarray, repeat: int) -> tuple[float, np.ndarray]:
    times, perm = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        perm = fn(C)
        times.append(time.perf_counter() - t)
    assert perm is not None
    return statistics.median(times), np.asarray(perm)


def compare(name: str, C: np.ndarray, repeat: int, table: list[dict[str, Any]]) -> None:
    C = np.ascontiguousarray(C, dtype=np.float64)
    n = C.shape[0]
    row = {"matrix": name, "n": n, "times": {}, "exact": {}}
    certified = len(np.unique(C.argmax(1))) == n
    ref_t, ref = timed(_scipy, C, repeat)
    best = value(C, ref)
    row["times"]["scipy"] = ref_t
    row["exact"]["scipy"] = "optimum"
    for label, fn in solvers().items():
        if label == "scipy":
            continue
        try:
            t, perm = timed(fn, C, repeat)
        except Exception as e:  # a library that rejects the input is reported, not fatal
            row["times"][label] = None
            row["exact"][label] = f"error {type(e).__name__}"
            continue
        row["times"][label] = t
        is_perm = len(np.unique(perm)) == n
        gap = (best - value(C, perm)) / max(abs(best), 1e-300) if is_perm else float("nan")
        if not is_perm:
            row["exact"][label] = "not a permutation"
        elif np.array_equal(perm, ref) or gap <= 1e-12:
            row["exact"][label] = "exact"
        else:
            row["exact"][label] = f"gap {gap:.1e}"
    if "lap.lapjv (x)" in row["times"]:
        import lap
        y = lap.lapjv(-C)[2]
        row["y_gain"] = value(C, y) - value(C, np.arange(n))
    row["x_gain"] = best - value(C, np.arange(n))
    row["certified"] = certified
    table.append(row)
    times = ", ".join(f"{k} {v:.4f}s" if v is not None else f"{k} -" for k, v in row["times"].items())
    print(f"{name:48s} n={n:5d} {times}  {row['exact']}", flush=True)


def synthetic(sizes: list[int], repeat: int, table: list[dict[str, Any]]) -> None:
    rng = np.random.default_rng(0)
    for n in sizes:
        compare("synthetic random N(0,1)", rng.standard_normal((n, n)), repeat, table)
        compare("synthetic near-identity N(0,1) + 3 I", rng.standard_normal((n, n)) + 3 * np.eye(n), repeat, table)


REAL_GROUPS = ["unet.input_blocks.1.transformer.inner", "unet.input_blocks.4.transformer.inner",
               "te.residual", "unet.time_embed.hidden", "unet.input_blocks.4.transformer.ff",
               "te.layers.0.mlp", "unet.input_blocks.7.transformer.ff", "unet.middle_block.1.transformer.ff"]
GN_GROUP = "unet.input_blocks.7.inner"  # 1280 channels, GroupNorm blocks of 40


def real(data: Path, repeat: int, table: list[dict[str, Any]], block_table: list[dict[str, Any]]) -> None:
    import torch

    from lib_rebasin.align import assignment
    from lib_rebasin.sd1.config import SD15
    from lib_rebasin.io.checkpoint import open_checkpoint
    from lib_rebasin.align.weight_matching import cost_matrix
    from lib_rebasin.sd1.spec import build_spec

    spec = build_spec(SD15)
    for pair, label in (("X", "independent"), ("Y", "same-base")):
        pa, pb = data / "full" / f"{pair}_a.safetensors", data / "full" / f"{pair}_b.safetensors"
        if not (pa.exists() and pb.exists()):
            print(f"pair {pair}: {pa} / {pb} missing, skipped (python -m benchmarks.run generates them)")
            continue
        with open_checkpoint(pa) as A, open_checkpoint(pb) as B:
            # Legacy mode's matrices: one GroupNorm's (weight, bias) against another's, a rank-2 fp32 sum of outer
            # products, solved 6 times per iteration (3000 solves for 500 iterations).
            try:
                from lib_rebasin.merge.legacy import SPECIAL_GROUPS
            except ImportError:
                SPECIAL_GROUPS = ()
            for w, bias in SPECIAL_GROUPS:
                ta, tb = (A.get(w).float(), A.get(bias).float()), (B.get(w).float(), B.get(bias).float())
                n = ta[0].numel()
                C32 = ta[0].reshape(n, 1) @ tb[0].reshape(1, n) + ta[1].reshape(n, 1) @ tb[1].reshape(1, n)
                compare(f"legacy rank-2 {pair} ({label}) {w.rsplit('.', 1)[0]}", C32.double().numpy(), repeat,
                        table)
            for gname in REAL_GROUPS + [GN_GROUP]:
                g = spec.groups.get(gname)
                if g is None:
                    print(f"group {gname} not in the spec, skipped")
                    continue
                C = cost_matrix(spec, g, A.get, B.get, {}, torch.device("cpu")).double().numpy()
                if gname != GN_GROUP:
                    compare(f"real {pair} ({label}) {gname} [{g.kind}]", C, repeat, table)
                    continue
                structure = g.structure
                row: dict[str, Any] = {"matrix": f"real {pair} ({label}) {gname} [{g.kind}, levels "
                                                 f"{structure.levels}]", "n": g.size, "times": {}, "exact": {}}
                original = assignment.lap
                ref = None
                for sname, fn in solvers().items():
                    def lap_with(M: np.ndarray, fn: Solver = fn) -> tuple[np.ndarray, float]:
                        cols = np.asarray(fn(np.ascontiguousarray(M)))
                        return cols, value(M, cols)
                    assignment.lap = lap_with
                    try:
                        t, perm = timed(lambda M: assignment.solve(M, structure), C, repeat)
                    finally:
                        assignment.lap = original
                    row["times"][sname] = t
                    if ref is None:
                        ref = perm
                        row["exact"][sname] = "optimum"
                    else:
                        gap = (value(C, ref) - value(C, perm)) / abs(value(C, ref))
                        row["exact"][sname] = "exact" if gap <= 1e-12 else f"gap {gap:.1e}"
                block_table.append(row)
                print(f"{row['matrix']}: {row['times']} {row['exact']}", flush=True)


def render(table: list[dict[str, Any]], block_table: list[dict[str, Any]], argv: list[str], load: str) -> str:
    names = list(solvers())
    head = ["matrix", "n", "argmax certifies"] + [f"{s} s" for s in names] + ["fastest", "exact vs scipy"]
    lines = [f"Command: `python -m benchmarks.lap_compare {' '.join(argv)}`; {load}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        ts = {k: v for k, v in r["times"].items() if v is not None}
        fastest = min(ts, key=ts.get) if ts else "—"
        exact = "; ".join(f"{k}: {v}" for k, v in r["exact"].items() if k != "scipy")
        if "y_gain" in r:
            exact += f"; lap y (column->row) gain {r['y_gain']:+.4g} vs optimum {r['x_gain']:+.4g}"
        cells = [r["matrix"], r["n"], "yes" if r["certified"] else "no"] + [
            f"{r['times'][s]:.4f}" if r["times"].get(s) is not None else "—" for s in names] + [fastest, exact]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    if block_table:
        lines += ["", "GroupNorm-structured solve (`lib_rebasin.align.assignment.solve`, each backend swapped in for its "
                  "`lap`):", "", "| " + " | ".join(["matrix", "n"] + [f"{s} s" for s in names] + ["exact"]) + " |",
                  "|" + "---|" * (len(names) + 3)]
        for r in block_table:
            cells = [r["matrix"], r["n"]] + [f"{r['times'][s]:.4f}" for s in names] + [
                "; ".join(f"{k}: {v}" for k, v in r["exact"].items() if k != "scipy")]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path(os.environ.get("BENCH_DATA", "bench_data")))
    p.add_argument("--sizes", type=int, nargs="+", default=[320, 640, 1280, 2560, 5120])
    p.add_argument("--repeat", type=int, default=3, help="runs per solver and matrix (median reported)")
    p.add_argument("--no-real", action="store_true", help="skip the real cost matrices")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    import lap
    import lapjv
    from importlib.metadata import version
    print(f"lap {version('lap')}, lapjv {version('lapjv')}, scipy {version('scipy')}, numpy {np.__version__}")
    load0 = os.getloadavg()
    table: list[dict[str, Any]] = []
    block_table: list[dict[str, Any]] = []
    synthetic(args.sizes, args.repeat, table)
    if not args.no_real:
        real(args.data, args.repeat, table, block_table)
    load1 = os.getloadavg()
    load = (f"lap {version('lap')}, lapjv {version('lapjv')}, scipy {version('scipy')}; load average 1-min "
            f"{load0[0]:.2f} before, {load1[0]:.2f} after")
    md = render(table, block_table, argv, load)
    print(md)
    if args.out:
        args.out.write_text(md)
    _ = (lap, lapjv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
