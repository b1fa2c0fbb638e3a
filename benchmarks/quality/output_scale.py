"""How far a merge's epsilon prediction is from the scale the squared error prefers (a diagnostic quoted in
RESULTS.md, "Post-merge levers").

For each method's merge at alpha 0.5 (and parent A): the prediction's std, its correlation rho with the true
noise, and the least-squares global scale c = <eps_hat, eps> / <eps_hat, eps_hat> with the loss at that scale.
c is fitted on the held-out set itself, so this explains REPAIR's result; it is not a merge method.

    python -m benchmarks.quality.output_scale --data bench_data/quality --pair "w32 s200"
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file

from .evaluate import Model, eval_set
from .export import single_file
from .families import FULL
from .levers import BASES, PAIRS, _pair, aligned_b


@torch.no_grad()
def describe(width: int, ldm: dict, es, batch: int = 160) -> str:
    model = Model(width, ldm)
    eps = torch.cat([model.eps(es.x_t[i:i + batch], es.t[i:i + batch], es.labels[i:i + batch])
                     for i in range(0, len(es.t), batch)])
    c = float((eps * es.noise).sum() / (eps * eps).sum())
    rho = float(torch.corrcoef(torch.stack([eps.flatten(), es.noise.flatten()]))[0, 1])
    return (f"loss {float((eps - es.noise).pow(2).mean()):.4f}, std {float(eps.std()):.3f}, rho {rho:.3f}, "
            f"best scale {c:.3f}, loss at best scale {float((c * eps - es.noise).pow(2).mean()):.4f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.quality.output_scale")
    ap.add_argument("--data", type=Path, default=Path("bench_data/quality"))
    ap.add_argument("--pair", default="w32 s200", choices=list(PAIRS))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    width, (ta, tb) = _pair(args.data, args.pair)
    a, b = single_file(ta), single_file(tb)
    ldm_a = load_file(str(a))
    es = eval_set(FULL.eval_images)
    print(f"parent A: {describe(width, ldm_a, es)}")
    for base in BASES:
        ldm_b = load_file(str(aligned_b(a, b, base, args.data / "work")))
        print(f"{base.label}, alpha 0.5: {describe(width, {k: 0.5 * ldm_a[k] + 0.5 * ldm_b[k] for k in ldm_a}, es)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
