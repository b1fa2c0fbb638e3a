"""Does a sweep result hold on another seed pair? Trains (or reuses, from the benchmark's model cache) an
independent pair with other init and data seeds at one width and length, then measures each method's barrier at
alpha 0.5 and its ratio to the weighted sum's with the sweep's own measurement (`run.at_half`: every merge
through `merging.merge`).

    python -m benchmarks.quality.seed_check --data bench_data/quality --width 64 --steps 400 --seeds 3 4

The benchmark's own pair is seeds 1 / 2 (`families.independent_pair`: seed s inits with s, orders its data with
100 + s), at the width's learning rate and the full profile's batch.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .evaluate import Model, eval_set, heldout_loss
from .families import FULL, MATCH_IMAGES, independent_pair, sweep_lengths
from .method_lines import SWEEP_METHODS
from .run import at_half
from .train import load_ldm, train


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path("bench_data/quality"))
    ap.add_argument("--width", type=int, required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--seeds", type=int, nargs=2, default=[3, 4])
    ap.add_argument("--methods", nargs="+", default=[m.label for m in SWEEP_METHODS],
                    help="method labels (method_lines.py); the weighted sum is always measured first")
    ap.add_argument("--train-only", action="store_true", help="train (or check) the pair, measure nothing")
    ap.add_argument("--out", type=Path, help="write the numbers as JSON")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfgs = independent_pair(FULL, args.width, args.steps, tuple(args.seeds))
    # The sweep's shorter states are saved on the way (so other lengths of this pair cost no training), and a
    # longer run resumes from the longest one trained before.
    lengths = sweep_lengths(FULL, args.width, args.steps)
    pair = [train(args.data, cfg, lengths, log=lambda s: print(s, flush=True))[args.steps] for cfg in cfgs]
    if args.train_only:
        return 0
    es = eval_set(FULL.eval_images)
    parents = [heldout_loss(Model(args.width, load_ldm(t)), es)["mean"] for t in pair]
    mid = sum(parents) / 2
    by_label = {m.label: m for m in SWEEP_METHODS}
    labels = [SWEEP_METHODS[0].label] + [lab for lab in args.methods if lab != SWEEP_METHODS[0].label]
    out = {"width": args.width, "steps": args.steps, "seeds": args.seeds, "parents": parents, "barrier": {},
           "ratio": {}}
    work = args.data / "work"
    for label in labels:
        out["barrier"][label] = at_half(args.width, *pair, by_label[label], mid, es, work,
                                        MATCH_IMAGES["full"])["barrier"]
        out["ratio"][label] = out["barrier"][label] / out["barrier"][labels[0]]
        print(f"w{args.width} {args.steps} steps, seeds {args.seeds}: {label} barrier {out['barrier'][label]:+.4f}"
              f" ratio {out['ratio'][label]:.3f}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
