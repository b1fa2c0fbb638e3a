"""The spec's symmetries as a lever (issue 10): re-basin's barrier ratio at alpha 0.5 on cached independent pairs,
for whichever `lib_rebasin` is first on the path, so that one command measures two versions of the spec:

    PYTHONPATH=TREE python -m benchmarks.quality.spec_levers --data DATA --out rows.json [--pairs w32s200 ...]

Each row: held-out loss of A and B, of the weighted sum and of re-basin (defaults) at alpha 0.5, their barriers,
re-basin / weighted sum, units moved per part, and the spec's census (attention groups, and how many units sit in
fixed intervals of a single channel, i.e. cannot move). Only models already in DATA's cache are used (no training).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from .evaluate import Model, eval_set, heldout_loss
from .export import single_file
from .families import FULL, independent_pair, sweep_lengths
from .layout import sd_config
from .merging import merge
from .method_lines import REBASIN, WEIGHTED_SUM
from .train import cached, load_ldm


def census(width: int) -> dict:
    from lib_rebasin.sd1.spec import build_spec

    spec = build_spec(sd_config(width))
    groups = spec.groups_in(("unet", "te"))
    frozen = sum(1 for g in groups for lo, hi in g.structure.intervals if hi - lo == 1)
    attention = [g for g in groups if getattr(g, "head_dim", 0)]
    return {"groups": len(groups), "attention_groups": len(attention), "frozen_units": frozen}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.quality.spec_levers")
    ap.add_argument("--data", type=Path, default=Path("bench_data/quality"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--pairs", nargs="*", default=None, help="e.g. w32s200 w96s100 (default: every cached pair)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import lib_rebasin

    es = eval_set(FULL.eval_images)
    work = args.data / "work"
    rows = []
    for width in FULL.widths:
        for steps in sweep_lengths(FULL, width):
            if args.pairs is not None and f"w{width}s{steps}" not in args.pairs:
                continue
            pair = [cached(args.data, cfg) for cfg in independent_pair(FULL, width, steps)]
            if None in pair:
                continue
            a, b = pair
            la = heldout_loss(Model(width, load_ldm(a)), es)["mean"]
            lb = heldout_loss(Model(width, load_ldm(b)), es)["mean"]
            row: dict = {"width": width, "steps": steps, "loss_a": la, "loss_b": lb, **census(width)}
            for m in (WEIGHTED_SUM, REBASIN):
                t0 = time.process_time()
                merged = merge(single_file(a), single_file(b), m, 0.5, work)
                loss = heldout_loss(Model(width, merged.ldm), es)["mean"]
                row[m.label] = {"loss": loss, "barrier": loss - (la + lb) / 2, "moved": merged.moved,
                                "cpu_s": time.process_time() - t0}
            row["ratio"] = row[REBASIN.label]["barrier"] / row[WEIGHTED_SUM.label]["barrier"]
            row["lib_rebasin"] = str(Path(lib_rebasin.__file__).parent)
            row["measured"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            row["load_average_end"] = os.getloadavg()[0]
            print(json.dumps(row), flush=True)
            rows.append(row)
            args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
