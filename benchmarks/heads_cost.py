"""What whole-head permutations cost in the assignment step, at full SD 1.5 size (issue 10).

    python -m benchmarks.heads_cost [--repeat 5]

For every distinct attention shape of SD 1.5 (UNet attn1 / attn2 at widths 320, 640, 1280; text encoder), the
cost matrix of one real group on the synthetic independent pair X (`make_checkpoint` seeds 1 and 2, the tensors
`benchmarks.run` generates, built here for the group's keys only), then, interleaved, medians of:
- *heads*: `assignment.solve` under the attention structure (heads x heads block values for q/k and v/o, one
  assignment over heads, the chosen pairs' within-head assignments);
- *per head*: what the spec did before, one assignment per head and half (2 x heads problems of head_dim).
The cost-matrix GEMMs are the same in both (same slots, same products), so the difference is the whole extra cost
per visit; the per-sweep figure multiplies by the groups of each shape (each group is visited once per sweep).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from lib_rebasin.sd1.config import SD15
from lib_rebasin.align.assignment import lap, solve
from lib_rebasin.align.weight_matching import cost_matrix
from lib_rebasin.sd1.spec import build_spec
from lib_rebasin.sd1.synthetic import synthetic_tensor


def per_head(C: np.ndarray, d: int) -> np.ndarray:
    n = C.shape[0]
    perm = np.empty(n, dtype=np.int64)
    for lo in range(0, n, d):
        perm[lo:lo + d] = lo + lap(C[lo:lo + d, lo:lo + d])[0]
    return perm


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.heads_cost")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    spec = build_spec(SD15)
    shapes: dict[tuple, list[str]] = {}
    for g in spec.groups.values():
        if g.kind == "attention" and g.part in ("unet", "te"):
            ctx = next(spec.shapes[s.key][1] for s in g.slots if s.key.endswith(("to_k.weight", "k_proj.weight")))
            shapes.setdefault((g.part, g.size // 2, g.head_dim, ctx), []).append(g.name)
    print("| attention (part, width, head dim, k/v input) | groups | heads: solve s | per head: solve s | extra s per sweep |")
    print("|---|---|---|---|---|")
    total_heads = total_old = 0.0
    for (part, width, d, ctx), names in sorted(shapes.items()):
        g = spec.groups[names[0]]
        keys = {s.key for s in g.slots}
        a = {k: synthetic_tensor(k, spec.shapes[k], 1, None, 0.0, SD15.timesteps) for k in keys}
        b = {k: synthetic_tensor(k, spec.shapes[k], 2, None, 0.0, SD15.timesteps) for k in keys}
        C = cost_matrix(spec, g, a.__getitem__, b.__getitem__, {}, torch.device("cpu")).double().numpy()
        t_new, t_old = [], []
        for _ in range(args.repeat):
            t0 = time.process_time()
            new = solve(C, g.structure)
            t_new.append(time.process_time() - t0)
            t0 = time.process_time()
            old = per_head(C, d)
            t_old.append(time.process_time() - t0)
        rows = np.arange(len(new))
        # The head structure contains every per-head permutation, so its optimum is never lower.
        assert C[rows, new].sum() >= C[rows, old].sum() - 1e-9 * abs(C[rows, old].sum())
        mn, mo = statistics.median(t_new), statistics.median(t_old)
        total_heads += mn * len(names)
        total_old += mo * len(names)
        print(f"| {part}, {width}, {d}, {ctx} | {len(names)} | {mn:.4f} | {mo:.4f} | {(mn - mo) * len(names):.3f} |")
    print(f"\nper sweep, all {sum(map(len, shapes.values()))} attention groups: heads {total_heads:.2f} s, "
          f"per head {total_old:.2f} s (process CPU time, medians of {args.repeat})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
