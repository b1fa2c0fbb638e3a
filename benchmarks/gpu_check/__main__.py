"""python -m benchmarks.gpu_check: every path of a merge that depends on the device, run on it and checked against the
CPU (benchmarks/README.md, "GPU check").

1. Parity: each case at the parity scale (mini when --scale full, else --scale) on --device and on the CPU, compared
   (parity.py). With --device cpu both runs are CPU runs: they must be bit-identical (determinism).
2. Full scale (--scale full): each case on --device, timed; the cases whose CPU run fits the time at full scale
   (cases.py: cpu_at_full) are also run on the CPU there and compared.
A case is skipped (and says so) once --time-limit seconds have passed; the table is rewritten after every run, so a
check stopped from outside still leaves what it measured. Exit status 1 when any parity fails.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .cases import CASES, Case, Inputs, card_name, measured, sweep_available, work_of
from .parity import Parity, compare_all
from .report import Row, markdown


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", help="the device checked against the CPU (cuda, cuda:N or cpu)")
    p.add_argument("--scale", default="full", choices=["full", "mini", "tiny"],
                   help="full: full-size SD 1.5 timings plus parity at mini; mini / tiny: everything at that scale")
    p.add_argument("--parity-scale", default="mini", choices=["mini", "tiny"],
                   help="the scale of the parity runs when --scale is full")
    p.add_argument("--data", type=Path, default=Path(os.environ.get("BENCH_DATA", "bench_data")) / "gpu_check",
                   help="where the synthetic inputs are made (reused when present)")
    p.add_argument("--out", type=Path, default=None,
                   help="the Markdown table (a folder: <card>_<date>.md in it); default: $OUT if set, else "
                        "benchmarks/gpu_results/")
    p.add_argument("--cases", nargs="+", choices=[c.name for c in CASES], help="only these cases")
    p.add_argument("--time-limit", type=float, default=380.0,
                   help="seconds after which the remaining runs are skipped (the table says which)")
    p.add_argument("--workers", type=int, default=4, help="processes making the full-size inputs")
    return p


def _out_file(arg: Path | None, card: str) -> Path:
    folder = arg if arg is not None else Path(os.environ["OUT"]) if os.environ.get("OUT") else \
        Path(__file__).resolve().parent.parent / "gpu_results"
    if folder.suffix == ".md":
        return folder
    slug = re.sub(r"[^A-Za-z0-9]+", "_", card).strip("_").lower()
    return folder / f"{slug}_{datetime.date.today().isoformat()}.md"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: --device cuda but torch sees no CUDA GPU here; use --device cpu for the dry run.",
              file=sys.stderr)
        return 2
    started = time.perf_counter()
    card = card_name(device)
    out_md = _out_file(args.out, card)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    work_root = args.data / "outputs"
    cases = [c for c in CASES if args.cases is None or c.name in args.cases]
    parity_scale = args.parity_scale if args.scale == "full" else args.scale
    header = {
        "card": card, "device": device, "date": datetime.datetime.now(datetime.timezone.utc).strftime(
            "%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__, "cpus": str(os.cpu_count()), "python": platform.python_version(),
        "command": "python -m benchmarks.gpu_check " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    rows: list[Row] = []

    def write() -> None:
        out_md.write_text(markdown(header, rows))
        out_md.with_suffix(".json").write_text(json.dumps({"header": header, "rows": [r.as_dict() for r in rows]},
                                                          indent=1))

    def over_time() -> bool:
        return time.perf_counter() - started > args.time_limit

    # The full-size inputs are made in the background while the parity runs at the smaller scale go on.
    inputs = {scale: Inputs(args.data, scale, args.workers) for scale in dict.fromkeys([parity_scale, args.scale])}
    for scale, made in inputs.items():
        models, seconds = made.wait()
        rows.append(Row("inputs", f"4 synthetic fp16 models ({', '.join(models)})", scale, made=seconds))
        write()
        for case in cases:
            both = scale == parity_scale or case.cpu_at_full
            cheap = scale != "full"
            rows.append(_check(case, models, scale, device, both, cheap, work_root, over_time))
            print(rows[-1].line(), flush=True)
            write()
    shutil.rmtree(work_root, ignore_errors=True)
    header["total"] = f"{time.perf_counter() - started:.0f} s"
    write()
    failed = [r for r in rows if r.parity is not None and not r.parity.ok]
    print(f"\n{markdown(header, rows)}\nwritten to {out_md}"
          + (f"\nPARITY FAILED: {', '.join(r.case for r in failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


def _check(case: Case, models: dict[str, Path], scale: str, device: str, with_cpu: bool, cheap: bool,
           work_root: Path, over_time: Callable[[], bool]) -> Row:
    """One case at one scale: the device run, and where `with_cpu` the CPU run and their parity."""
    row = Row(case.name, case.what, scale)
    if case.kind == "sweep" and not sweep_available():
        row.note = "not run: lib_rebasin.merge.sweep does not exist yet"
        return row
    if over_time():
        row.note = "skipped: time limit reached"
        return row
    dev_dir, ref_dir = work_root / scale / "device" / case.name, work_root / scale / "cpu" / case.name
    row.device_run = measured(device, work_of(case, models, dev_dir, device, cheap))
    if not with_cpu:
        row.note = "timed only (its parity is checked at the smaller scale)"
    elif not row.device_run.error:
        if over_time():
            row.note = "CPU run skipped: time limit reached"
        else:
            row.cpu_run = measured("cpu", work_of(case, models, ref_dir, "cpu", cheap))
            if not row.cpu_run.error:
                row.parity = compare_all(row.device_run.outputs, row.cpu_run.outputs, exact=device == "cpu")
    errors = [r.error for r in (row.device_run, row.cpu_run) if r is not None and r.error]
    if errors:
        row.parity = Parity("FAIL", "; ".join(errors))
    for folder in (dev_dir, ref_dir):
        shutil.rmtree(folder, ignore_errors=True)
    return row


if __name__ == "__main__":
    sys.exit(main())
