"""The same-base proof's work, counted rather than timed (issue 22, section 1).

    python -m benchmarks.proof_work A.safetensors B.safetensors [SHARE:COLUMNS ...]

Runs weight matching alone (UNet, text encoder and VAE groups, as a default merge matches them) once per first-stage
setting (`align/partial_certificate.FIRST_SHARE` and `FIRST_COLUMNS`; default: the module's own) and prints, for
each, the multiply-adds of the proof's products by stage (rows x units x columns of each window product), how many
rows and (row, unit) pairs the first stage left unproven, the groups certified and the CPU seconds. The counts do
not depend on the machine's load, so first-stage settings can be compared on a shared machine where timings of a
few percent drown in its noise; the seconds are there only as a rough check.
"""

from __future__ import annotations

import argparse
import collections
import time
from typing import Any

import torch


def run(a: str, b: str, settings: list[tuple[float, int]]) -> list[dict[str, Any]]:
    import lib_rebasin.align.partial_certificate as pc
    import lib_rebasin.align.proof_windows as pw
    from lib_rebasin.align.weight_matching import weight_matching
    from lib_rebasin.io.finite import Model, guard_getter
    from lib_rebasin.io.model_input import open_model, spec_for

    torch.set_num_threads(1)
    A, B = open_model(a, "A"), open_model(b, "B")
    ca, cb = A.ckpt, B.ckpt
    spec = spec_for(A.config)
    groups = spec.groups_in(("unet", "text_encoder", "vae"))
    ma, mb = Model("A", ca.path.name, ca.get, ca.keys()), Model("B", cb.path.name, cb.get, cb.keys())
    macs: collections.Counter[int] = collections.Counter()
    first: collections.Counter[str] = collections.Counter()
    add_window_of, margin = pw._add_window_of, pc._margin

    def counted(members: list[Any], stage: int, P: torch.Tensor, pending: torch.Tensor | None,
                col_sq: torch.Tensor, fresh: bool = False) -> None:
        head = members[0]
        rows = head.slot.length if pending is None else len(pw.local_rows(pending, head))
        columns = sum(max(0, sl.cuts[stage + 1] - sl.cuts[stage]) * sl.inner for sl in members)
        macs[stage] += rows * head.slot.length * columns
        add_window_of(members, stage, P, pending, col_sq, fresh)

    def margin_counted(P: torch.Tensor, col_sq: torch.Tensor, rows: torch.Tensor, cur: torch.Tensor,
                       diff: torch.Tensor, widening: torch.Tensor) -> torch.Tensor:
        m = margin(P, col_sq, rows, cur, diff, widening)
        if len(rows) == P.shape[0]:  # a group's first check: every row open
            q = P[rows].double() - col_sq / 2
            q[torch.arange(len(rows)), cur[rows]] = float("-inf")
            failed = q >= m[:, None]
            first["rows"] += len(rows)
            first["rows left"] += int(failed.any(dim=1).sum())
            first["pairs left"] += int(failed.sum())
        return m

    pw._add_window_of, pc._margin = counted, margin_counted  # type: ignore[assignment]
    defaults = pc.FIRST_SHARE, pc.FIRST_COLUMNS
    out = []
    try:
        for share, columns in settings or [defaults]:
            pc.FIRST_SHARE, pc.FIRST_COLUMNS = share, columns
            macs.clear()
            first.clear()
            get_a, get_b = guard_getter(ca.get, ma, False), guard_getter(cb.get, mb, False)
            t = time.process_time()
            res = weight_matching(spec, groups, get_a, get_b, device=torch.device("cpu"), keep=(False, False))
            out.append({"first share": f"1/{share:g}", "first columns": columns,
                        "GMAC by stage": [round(macs[s] / 1e9, 2) for s in sorted(macs)],
                        "GMAC": round(sum(macs.values()) / 1e9, 2), **first,
                        "certified": res.certified, "solves": res.solves, "groups": len(groups),
                        "CPU s": round(time.process_time() - t, 1)})
            print(out[-1], flush=True)
    finally:
        pw._add_window_of, pc._margin = add_window_of, margin  # type: ignore[assignment]
        pc.FIRST_SHARE, pc.FIRST_COLUMNS = defaults
        ca.close()
        cb.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("settings", nargs="*", help="first-stage settings as SHARE:COLUMNS (e.g. 128:64)")
    args = p.parse_args()
    settings = [(float(s.split(":")[0]), int(s.split(":")[1])) for s in args.settings]
    run(args.a, args.b, settings)


if __name__ == "__main__":
    main()
