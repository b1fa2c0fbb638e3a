"""Does the core's activation matching reproduce the benchmark lever's barrier? One cached independent pair,
alpha 0.5, held-out loss of A, B and of each merge (every merge through `merging.merge`, i.e. the core's API).

    python -m benchmarks.quality.activation_check A-sd15layout.safetensors B-sd15layout.safetensors --width 32

Barrier = loss(merge at 0.5) - (loss A + loss B) / 2; ratio = barrier / the weighted sum's barrier. The lever
matched on 64 training images at 5 noise levels with the 11 class prompts; the core option uses no data (seeded
prompts, A's own DDIM trajectory from noise, 16x16 latents where these models were trained on 8x8).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from .evaluate import Model, eval_set, heldout_loss
from .merging import merge
from .method_lines import ACTIVATIONS, REBASIN, WEIGHTED_SUM, Method

LEVER = Method("activation matching (lever)", "weighted_sum", align="activations")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--width", type=int, required=True)
    ap.add_argument("--eval-images", type=int, default=64)
    ap.add_argument("--samples", type=int, nargs="+", default=[16], help="activation_samples of the core option")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    es = eval_set(args.eval_images)
    parents = [heldout_loss(Model(args.width, load_file(str(p))), es)["mean"] for p in (args.a, args.b)]
    mid = sum(parents) / 2
    core = [Method(f"activation matching, {n} samples", "rebasin",
                   {**ACTIVATIONS.options, "activation_samples": n}) for n in args.samples]
    rows = {}
    with tempfile.TemporaryDirectory() as work:
        for m in (WEIGHTED_SUM, REBASIN, *core, LEVER):
            merged = merge(args.a, args.b, m, 0.5, Path(work))
            loss = heldout_loss(Model(args.width, merged.ldm), es)["mean"]
            rows[m.label] = {"loss": loss, "barrier": loss - mid, "seconds": merged.seconds}
            print(f"{m.label}: loss {loss:.4f}, barrier {loss - mid:+.4f}, {merged.seconds:.1f} s", flush=True)
    ws = rows[WEIGHTED_SUM.label]["barrier"]
    for r in rows.values():
        r["ratio"] = r["barrier"] / ws
    result = {"parents": parents, "methods": rows}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
