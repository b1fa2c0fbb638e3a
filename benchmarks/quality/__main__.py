"""python -m benchmarks.quality [--quick | --profile NAME] [--out DIR] [--data DIR] [--threads N]"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .run import SECTIONS


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.split("\n")[0] + (
        ": merge quality of every method on small SD-1.x-layout diffusion models trained here"))
    ap.add_argument("--quick", action="store_true",
                    help="train a few steps and check the controls (exit status 1 if one fails)")
    ap.add_argument("--profile", choices=("full", "quick", "smoke"), default=None,
                    help="the profile to run (default full, or quick with --quick); smoke is the test suite's "
                         "quick mode: the same checks, shorter training and sampling")
    ap.add_argument("--data", type=Path, default=Path("bench_data/quality"),
                    help="cache of trained models (default ./bench_data/quality, git-ignored)")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default DATA/results-PROFILE)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help="measure only these (comma-separated; default all); the others are taken from earlier "
                         "runs when cached, else left out of the report")
    ap.add_argument("--no-train", action="store_true",
                    help="use only models already in the cache; sections (and sweep rows) needing others are left out")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from .controls_check import failures
    from .families import PROFILES
    from .report import write
    from .run import run

    profile = PROFILES[args.profile or ("quick" if args.quick else "full")]
    sections = tuple(s for s in args.sections.split(",") if s)
    bad_names = [s for s in sections if s not in SECTIONS]
    if bad_names:
        ap.error(f"unknown section(s) {', '.join(bad_names)}; choose from {', '.join(SECTIONS)}")
    results = run(profile, args.data, sections, not args.no_train, log=lambda s: print(s, flush=True))
    path = write(results, args.out or args.data / f"results-{profile.name}")
    print(f"wrote {path}")
    bad = failures(results["controls"]) if results["controls"] else []
    for line in bad:
        print(f"CONTROL FAILED: {line}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
