"""What a merge reports: moved units, matching effort, the alignment objective, and a plain-words summary."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from .matching import TensorGetter
from .options import METHODS
from .permute import Perms, permute_tensor
from .spec import ArchSpec


PART_NAMES = {"unet": "UNet", "te": "text encoder", "vae": "VAE"}


@dataclass
class Diagnostics:
    method: str
    alpha: float
    iterations: int
    parts: list[str]
    matched: bool = False
    sweeps: list[int] = field(default_factory=list)         # per matching run
    converged: bool = True
    solves: int = 0
    certified: int = 0
    match_steps: int = 0                                     # matching runs actually performed
    closed_form_steps: int = 0                               # iteration steps collapsed into the closed form
    moved: dict[str, list[int]] = field(default_factory=dict)  # part -> [units moved, units]
    objective: dict[str, list[float]] = field(default_factory=dict)  # part -> [<A,B>, <A,pi B>, |A|^2, |B|^2]
    top_groups: list[tuple[str, int, int]] = field(default_factory=list)  # (group, moved, size)
    copied_from_a: int = 0
    dropped_from_b: int = 0
    kept_a_extra_channels: bool = False
    seconds: float = 0.0

    def cosine(self, part: str) -> tuple[float, float] | None:
        o = self.objective.get(part)
        if not o or o[2] <= 0 or o[3] <= 0:
            return None
        norm = math.sqrt(o[2] * o[3])
        return o[0] / norm, o[1] / norm

    def summary_lines(self) -> list[str]:
        iterated = self.method in ("rebasin", "legacy") and self.iterations > 1
        lines = [f"Method: {METHODS[self.method].label}, alpha {self.alpha:g}"
                 + (f", {self.iterations} iterations" if iterated else "")
                 + f"; parts: {', '.join(PART_NAMES[p] for p in self.parts)}."]
        if self.matched:
            total_moved = sum(m for m, _ in self.moved.values())
            for part, (m, n) in self.moved.items():
                cos = self.cosine(part)
                gain = ""
                if cos is not None:
                    o = self.objective[part]
                    rel = (o[1] - o[0]) / abs(o[0]) * 100 if o[0] else float("inf")
                    gain = (f"; similarity to A {cos[0]:.4f} -> {cos[1]:.4f} "
                            f"(objective {'+' if o[1] >= o[0] else ''}{rel:.2f}%)")
                lines.append(f"{PART_NAMES[part]}: {m:,} of {n:,} units moved ({100 * m / max(n, 1):.1f}%){gain}.")
            lines.append(f"Weight matching: {sum(self.sweeps)} sweeps over {self.match_steps} run(s), "
                         f"{self.solves:,} assignment solves, {self.certified:,} skipped as provably optimal"
                         + ("" if self.converged else "; stopped at the sweep limit before converging") + ".")
            if self.closed_form_steps:
                lines.append(f"{self.closed_form_steps} of {self.iterations} iteration steps kept the same "
                             "permutation and were computed in closed form (exactly what running them gives).")
            if total_moved == 0:
                lines.append("B already lines up with A (every permutation is the identity): these models share "
                             "a basin, so this re-basin merge equals a plain weighted sum. That is expected for "
                             "fine-tunes of the same base.")
        if self.method == "legacy":
            lines.append("Legacy mode reproduces T0b1maru's re-basin_merger: every key is the weighted sum, except the "
                         "six UNet/VAE output GroupNorm vectors, which were re-matched and blended at each of the "
                         f"{self.iterations} iterations. It is not a function-preserving re-basin; use the "
                         "re-basin method for that.")
        if self.copied_from_a:
            lines.append(f"{self.copied_from_a} keys outside the merged parts or unknown to the spec were copied "
                         "from A unchanged.")
        if self.dropped_from_b:
            lines.append(f"{self.dropped_from_b} keys only present in B were not carried over.")
        if self.kept_a_extra_channels:
            lines.append("A's extra UNet input channels (inpainting / instruct-pix2pix) were kept from A.")
        lines.append(f"Finished in {self.seconds:.1f} s.")
        return lines

    def to_dict(self) -> dict[str, object]:
        return asdict(self)



def accumulate_objective(acc: list[float], spec: ArchSpec, key: str, get_a: TensorGetter, get_b: TensorGetter,
                          perms: Perms) -> None:
    """Add <A,B>, <A,pi(B)>, |A|^2, |B|^2 of one key (fp32 dot products, float64 running sums)."""
    a = get_a(key).float()
    b = get_b(key).float()
    accumulate(acc, a, b, permute_tensor(spec, key, b, perms))


def accumulate(acc: list[float], a: torch.Tensor, b: torch.Tensor, pb: torch.Tensor) -> None:
    if a.shape != b.shape:
        return  # an inpainting A's wider conv_in has no counterpart in B
    unpermuted = pb is b
    a, b, pb = a.reshape(-1), b.reshape(-1), pb.reshape(-1)
    ab = float(torch.dot(a, b))
    acc[0] += ab
    acc[1] += ab if unpermuted else float(torch.dot(a, pb))
    acc[2] += float(torch.dot(a, a))
    acc[3] += float(torch.dot(b, b))

