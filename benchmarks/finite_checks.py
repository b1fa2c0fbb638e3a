"""What the NaN/Inf checks (lib_rebasin/io/finite.py) and the float64 diagnostics cost inside a merge.

    python -m benchmarks.finite_checks --scale mini            # a few minutes on a shared 2-core machine
    python -m benchmarks.finite_checks --scale full --data bench_data

Runs real merges of synthetic checkpoints (lib_rebasin.sd1.synthetic, fp16) and reports, per method, the merge's CPU
time and the CPU time spent inside `all_finite` (every check: matching fetches and written tensors) and inside
the diagnostics' dot products. CPU time of this thread, not wall time: the machine this was written on is shared,
and wall times there swing by 2x from one run to the next while CPU shares hold still.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def _timed(module: object, name: str, total: list[float]) -> None:
    fn = getattr(module, name)

    def wrapper(*args: object, **kw: object) -> object:
        t = time.thread_time()
        try:
            return fn(*args, **kw)
        finally:
            total[0] += time.thread_time() - t

    setattr(module, name, wrapper)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", default="mini", choices=["mini", "full"])
    ap.add_argument("--data", default=None, help="folder for the inputs (default: a temporary folder)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from lib_rebasin.merge import diagnostics
    from lib_rebasin.io import finite
    from lib_rebasin.options import MergeOptions
    from lib_rebasin.merge.run import merge_checkpoints
    from lib_rebasin.sd1.synthetic import make_checkpoint

    checks, dots = [0.0], [0.0]
    _timed(finite, "all_finite", checks)
    _timed(diagnostics, "accumulate", dots)
    import lib_rebasin.merge.output as merge_output

    merge_output.accumulate = diagnostics.accumulate  # merge/output.py imported the name before it was wrapped

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else Path(tmp)
        data.mkdir(parents=True, exist_ok=True)
        pairs = {"same base (Y)": (dict(seed=11, base_seed=1), dict(seed=12, base_seed=1)),
                 "independent (X)": (dict(seed=1), dict(seed=2))}
        print(f"scale {args.scale}, {args.threads} thread(s), torch {torch.__version__}")
        print("| pair | method | merge CPU s | all_finite CPU s | share | diagnostics dots CPU s | share |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for label, (ka, kb) in pairs.items():
            tag = label.split()[-1].strip("()")
            a = data / f"finite_{args.scale}_{tag}_a.safetensors"
            b = data / f"finite_{args.scale}_{tag}_b.safetensors"
            for path, kw in ((a, ka), (b, kb)):
                if not path.exists():
                    make_checkpoint(path, args.scale, **kw)
            for method in ("weighted_sum", "rebasin"):
                checks[0] = dots[0] = 0.0
                out = Path(tmp) / "out.safetensors"
                t = time.thread_time()
                merge_checkpoints(a, b, out, MergeOptions(method=method, parts=("unet", "te")), overwrite=True)
                total = time.thread_time() - t
                out.unlink()
                print(f"| {label} | {method} | {total:.2f} | {checks[0]:.2f} | {100 * checks[0] / total:.1f} % "
                      f"| {dots[0]:.2f} | {100 * dots[0] / total:.1f} % |")


if __name__ == "__main__":
    main()
