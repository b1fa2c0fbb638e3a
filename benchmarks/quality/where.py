"""Where an aligned merge's barrier sits, and why. For one cached independent pair:

1. **Correspondence, group by group**: activation matching's correlations between A's and B's units
   (`activation_matching.correlations`, the core's own inputs), and the mean correlation of the units it pairs
   under the spec's legal structure, of units left in place, and of the best pairing *any* permutation would give
   (not function-preserving where GroupNorm groups constrain the group). Summarised by kind of group, with the
   residual streams that reach a straddling decoder concatenation (their structure has fixed intervals) apart.
2. **The barrier by region**: A with one region's weights interpolated at 0.5 with B aligned by activation
   matching (the core's merge at alpha 1 is B permuted), and with B as it is; the loss over A's.
3. With `--join-blocks`, the one legal symmetry the straddled streams' structure leaves out, as a lever: a
   permutation may also move whole *join blocks* (segments bounded by cuts that every GroupNorm partition of the
   group shares) onto join blocks with the same inner pattern, which maps every partition's groups onto its
   groups. The pairing with those moves allowed (checked against every partition, and by B's loss), and the
   weighted sum of A with B permuted that way, with and without REPAIR, through the core's merge.

    python -m benchmarks.quality.where --data bench_data/quality --width 96 --steps 800 --out where.json
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lib_rebasin.align.activation_matching import correlations, match
from lib_rebasin.align.assignment import lap, solve
from lib_rebasin.archspec import Group, Structure
from lib_rebasin.sd1.spec import build_spec

from .activations import permuted_copy
from .evaluate import Model, eval_set, heldout_loss
from .export import single_file
from .families import FULL, MATCH_IMAGES, independent_pair
from .layout import UNET_PREFIX, sd_config
from .merging import merge
from .method_lines import ACTIVATIONS, Method
from .train import cached, load_ldm

SAMPLES = ACTIVATIONS.options["activation_samples"]
# Regions of the UNet (key prefixes after the UNet's own). Level 0 is the full-resolution level; blocks 3-8 of
# each path and the middle block are the lower-resolution levels.
REGIONS: dict[str, tuple[str, ...]] = {
    "conv_in": ("input_blocks.0.",),
    "time embedding": ("time_embed.",),
    "level-0 encoder blocks (input 1-2)": ("input_blocks.1.", "input_blocks.2."),
    "lower levels (input 3-11, middle, output 0-8)": (*(f"input_blocks.{i}." for i in range(3, 12)),
                                                      "middle_block.",
                                                      *(f"output_blocks.{i}." for i in range(9))),
    "level-0 decoder blocks (output 9-11)": ("output_blocks.9.", "output_blocks.10.", "output_blocks.11."),
    "out (final norm and conv)": ("out.",),
}


def join_blocks(g: Group) -> list[tuple[int, int, tuple]]:
    """(start, end, inner pattern) of each segment bounded by cuts every partition of the group shares."""
    parts = [set(p) for p in g.partitions if p]
    bounds = sorted(set.intersection(*parts) | {0, g.size})
    return [(lo, hi, tuple(tuple(sorted(c - lo for c in p if lo < c < hi)) for p in parts) + (hi - lo,))
            for lo, hi in zip(bounds[:-1], bounds[1:])]


def with_block_moves(v: np.ndarray, g: Group) -> np.ndarray:
    """The best pairing under the spec's structure plus moves of whole join blocks with the same pattern."""
    st = g.structure
    blocks = join_blocks(g)
    perm = np.empty(g.size, dtype=np.int64)
    for pattern in {b[2] for b in blocks}:
        same = [b for b in blocks if b[2] == pattern]
        lo0, hi0 = same[0][:2]
        inner = [(lo - lo0, hi - lo0) for lo, hi in st.intervals if lo0 <= lo and hi <= hi0]
        value = np.zeros((len(same), len(same)))
        inside: dict[tuple[int, int], list[np.ndarray]] = {}
        for i, (la, _, _) in enumerate(same):
            for j, (lb, _, _) in enumerate(same):
                pieces = [solve(v[la + lo:la + hi, lb + lo:lb + hi], Structure(hi - lo, levels=st.levels))
                          for lo, hi in inner]
                value[i, j] = sum(v[la + lo + np.arange(hi - lo), lb + lo + q].sum()
                                  for (lo, hi), q in zip(inner, pieces))
                inside[i, j] = pieces
        cols, _ = lap(value)
        for i, j in enumerate(cols):
            la, lb = same[i][0], same[int(j)][0]
            for (lo, hi), q in zip(inner, inside[i, int(j)]):
                perm[la + lo:la + hi] = lb + lo + q
    return perm


def preserves_partitions(perm: np.ndarray, g: Group) -> bool:
    """Every GroupNorm group of the channels is mapped onto one of the same partition's groups."""
    for cuts in g.partitions:
        bounds = [0, *cuts, g.size]
        blocks = {frozenset(range(lo, hi)) for lo, hi in zip(bounds[:-1], bounds[1:])}
        if any(frozenset(int(perm[i]) for i in blk) not in blocks for blk in blocks):
            return False
    return True


def correspondence(width: int, a: dict, b: dict, block_moves: bool = False) -> tuple[list[dict], dict | None]:
    """Each UNet group's pairing quality, and with `block_moves` activation matching's permutations with every
    straddled group's join-block pairing in place of its own."""
    spec = build_spec(sd_config(width))
    groups = spec.groups_in(["unet"])
    corr = correlations(spec, groups, a.__getitem__, b.__getitem__, samples=SAMPLES, seed=0)
    perms = match(groups, corr)
    moved_perms = dict(perms) if block_moves else None
    rows = []
    for g in groups:
        if g.name not in perms:
            continue
        v = corr[g.name].value()
        units = torch.arange(g.size)
        free, _ = lap(v.numpy())
        rows.append({"group": g.name, "kind": g.kind, "size": g.size, "straddled": bool(g.structure.intervals),
                     "matched": float(v[units, perms[g.name]].mean()), "in_place": float(v.diagonal().mean()),
                     "any_permutation": float(v[units, torch.from_numpy(free)].mean())})
        if moved_perms is not None and g.structure.intervals:
            moved = with_block_moves(v.numpy(), g)
            assert preserves_partitions(moved, g), g.name
            moved_perms[g.name] = torch.from_numpy(moved)
            rows[-1]["with_block_moves"] = float(v[units, moved_perms[g.name]].mean())
    return rows, moved_perms


def by_kind(rows: list[dict]) -> dict[str, dict[str, float]]:
    out: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        kind = r["kind"] + (" (straddled)" if r["straddled"] else "")
        if r["group"] == "unet.input_blocks.0":
            kind = "level-0 stream (straddled)"
        out[kind].append(r)
    return {k: {f: sum(r[f] * r["size"] for r in rs) / sum(r["size"] for r in rs)
                for f in ("matched", "in_place", "any_permutation")} | {"groups": len(rs)}
            for k, rs in sorted(out.items())}


def regions(width: int, a: dict, b: dict, aligned: dict, loss_a: float, es) -> dict[str, dict[str, float]]:
    out = {}
    for name, prefixes in REGIONS.items():
        inside = tuple(UNET_PREFIX + p for p in prefixes)
        row = {}
        for label, other in (("aligned", aligned), ("as is", b)):
            mixed = {k: (0.5 * v + 0.5 * other[k] if k.startswith(inside) else v) for k, v in a.items()}
            row[label] = heldout_loss(Model(width, mixed), es)["mean"] - loss_a
        out[name] = row
    return out


def same_function(width: int, permuted: dict, loss_b: float, es, what: str) -> float:
    """B permuted must compute what B does: its held-out loss, to 1e-4."""
    diff = heldout_loss(Model(width, permuted), es)["mean"] - loss_b
    assert abs(diff) < 1e-4, f"{what} does not compute what B does (loss {diff:+.2e})"
    return diff


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path("bench_data/quality"))
    ap.add_argument("--width", type=int, required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--seeds", type=int, nargs=2, default=[1, 2])
    ap.add_argument("--join-blocks", action="store_true", help="also measure the join-block moves (above)")
    ap.add_argument("--out", type=Path, help="write the numbers as JSON")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    pair = []
    for cfg in independent_pair(FULL, args.width, args.steps, tuple(args.seeds)):
        t = cached(args.data, cfg)
        if t is None:
            raise SystemExit(f"not trained: {cfg.describe()} (train it with seed_check --train-only)")
        pair.append(t)
    a, b = (load_ldm(t) for t in pair)
    es = eval_set(FULL.eval_images)
    loss_a, loss_b = (heldout_loss(Model(args.width, m), es)["mean"] for m in (a, b))
    out: dict = {"width": args.width, "steps": args.steps, "seeds": args.seeds}

    out["groups"], block_perms = correspondence(args.width, a, b, args.join_blocks)
    out["by_kind"] = by_kind(out["groups"])
    print(f"w{args.width}, {args.steps} steps: mean correlation of paired units (legal / left in place / any "
          "permutation), weighted by units")
    for kind, r in out["by_kind"].items():
        print(f"  {kind:34s} {r['groups']:3d} groups  {r['matched']:.3f} / {r['in_place']:+.3f} / "
              f"{r['any_permutation']:.3f}")

    aligned = merge(single_file(pair[0]), single_file(pair[1]), ACTIVATIONS, 1.0, args.data / "work",
                    match_images=MATCH_IMAGES["full"]).ldm
    same_function(args.width, aligned, loss_b, es, "B permuted")
    out["regions"] = regions(args.width, a, b, aligned, loss_a, es)
    print("loss over A's with one region interpolated at 0.5 (B aligned by activation matching / B as is):")
    for name, r in out["regions"].items():
        print(f"  {name:48s} {r['aligned']:+.4f} / {r['as is']:+.4f}")
    if block_perms is not None:
        out["join_blocks"] = join_block_lever(args.width, pair, block_perms, (loss_a, loss_b), es,
                                              args.data / "work")
    if args.out:
        args.out.write_text(json.dumps(out, indent=1))
    return 0


def join_block_lever(width: int, pair, perms: dict, parents: tuple[float, float], es, work: Path) -> dict:
    """The weighted sum (and + REPAIR) of A with B permuted by activation matching with join-block moves."""
    single_a, single_b = single_file(pair[0]), single_file(pair[1])
    permuted = permuted_copy(build_spec(sd_config(width)), load_file(str(single_b)), perms)
    out = {"function_check": same_function(width, permuted, parents[1], es, "B permuted with join-block moves")}
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"{single_b.stem}-join-blocks-{os.getpid()}.safetensors"
    save_file(permuted, str(path))
    try:
        for label, options in (("weighted sum", {}),
                               ("weighted sum + REPAIR", {"repair": True, "activation_samples": SAMPLES})):
            merged = merge(single_a, path, Method(label, "weighted_sum", options), 0.5, work)
            out[label] = heldout_loss(Model(width, merged.ldm), es)["mean"] - sum(parents) / 2
            print(f"  B aligned with join-block moves, {label}: barrier {out[label]:+.4f}")
    finally:
        path.unlink(missing_ok=True)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
