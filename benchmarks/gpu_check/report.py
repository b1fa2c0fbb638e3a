"""The check's one table: a row per case and scale, printed and written as Markdown (with a JSON copy)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .cases import Run
from .parity import ELEMENT_SHARE, OBJECTIVE_RTOL, TENSOR_TOL, Parity

STAGES = ("matching", "repair", "hashing", "writing")


@dataclass
class Row:
    case: str
    what: str
    scale: str
    made: float | None = None            # the inputs row: seconds spent making them
    device_run: Run | None = None
    cpu_run: Run | None = None
    parity: Parity | None = None
    note: str = ""
    extra: list[str] = field(default_factory=list)

    def cells(self) -> list[str]:
        d, c = self.device_run, self.cpu_run
        if self.made is not None:
            return [self.case, self.scale, f"{self.made:.1f}" if self.made else "reused", "", "", "", "", "",
                    self.what]
        stages = " ".join(f"{k[:5]} {d.stages[k]:.1f}" for k in STAGES if d and d.stages.get(k, 0) >= 0.05)
        notes = [self.note] if self.note else []
        for r, who in ((d, "device"), (c, "CPU")):
            if r is not None and r.notices:
                notes.append(f"{who} notices: " + " | ".join(r.notices))
            if r is not None and r.rss_note:
                notes.append(r.rss_note)
        if self.parity is not None:
            notes.append(self.parity.detail)
            notes += [f"metadata: {m}" for m in self.parity.metadata[:5]]
        return [self.case, self.scale, f"{d.seconds:.1f}" if d else "-", stages,
                f"{d.vram_gib:.2f}" if d and d.vram_gib is not None else "-",
                f"{d.rss_gib:.2f}" if d and d.rss_gib is not None else "-",
                f"{c.seconds:.1f}" if c else "-", self.parity.status if self.parity else "-",
                "; ".join(notes).replace("|", "/")]

    def line(self) -> str:
        c = self.cells()
        return f"{c[0]:<20} {c[1]:<5} device {c[2]:>7} s  cpu {c[6]:>7} s  parity {c[7]:<16} {c[8][:150]}"

    def as_dict(self) -> dict[str, Any]:
        def run(r: Run | None) -> dict[str, Any] | None:
            if r is None:
                return None
            return {"seconds": r.seconds, "stages": r.stages, "vram_gib": r.vram_gib, "rss_gib": r.rss_gib,
                    "notices": r.notices, "error": r.error}

        return {"case": self.case, "what": self.what, "scale": self.scale, "made_s": self.made,
                "device": run(self.device_run), "cpu": run(self.cpu_run), "note": self.note,
                "parity": None if self.parity is None else {"status": self.parity.status,
                                                            "detail": self.parity.detail,
                                                            "metadata": self.parity.metadata}}


COLUMNS = ["case", "scale", "device s", "stages s (device)", "peak VRAM GiB", "peak RSS GiB", "CPU s", "parity",
           "notes"]


def markdown(header: dict[str, str], rows: list[Row]) -> str:
    lines = [f"# GPU check: {header['card']}, {header['date']}", ""]
    lines += [f"- {k}: `{v}`" if k == "command" else f"- {k}: {v}" for k, v in header.items() if k != "card"]
    lines += ["", "| " + " | ".join(COLUMNS) + " |", "| " + " | ".join(["---"] * len(COLUMNS)) + " |"]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    lines += ["", "Parity: bit-identical (two CPU runs must be), within tolerance (every tensor's max|device - cpu| "
              f"<= {TENSOR_TOL:.3g} x its max|cpu|, at most {ELEMENT_SHARE:g} of a tensor's elements over it for the "
              "per-element methods), same objective (permutations differ at near-ties, the objective within "
              f"{OBJECTIVE_RTOL:g}), or FAIL; metadata equal apart from the device and the counts of certified / "
              "solved groups (benchmarks/gpu_check/parity.py). Stages: wall seconds between the merge's progress "
              "stages. Peak VRAM: torch.cuda.max_memory_allocated of the device run; peak RSS: the process's "
              "high-water mark during the run.", ""]
    return "\n".join(lines)
