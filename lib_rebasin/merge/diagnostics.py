"""What a merge reports: moved units, matching effort, the alignment objective, and a plain-words summary."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..align.permute import Perms, permute_tensor
from ..align.weight_matching import TensorGetter
from ..archspec import ArchSpec
from ..methods import METHODS
from ..parts import PART_NAMES


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
    blocks: list[float] | None = None                        # block weights of B (26, or 20 for SDXL), if used
    blocks_preset: str | None = None
    aligned: bool = False                                    # re-basin alignment before another method
    baked_vae: str | None = None                             # file whose VAE was baked into the output
    params: dict[str, float] = field(default_factory=dict)   # the method's parameters (methods.py)
    matching: str = "weights"                                # how the permutations were found
    activation_samples: int = 0                              # prompts activation matching ran, if it did
    repaired_layers: int = 0                                 # UNet layers REPAIR corrected (0: no REPAIR)
    repair_samples: int = 0                                  # prompts REPAIR's statistics were measured on
    repair_scale: list[float] = field(default_factory=list)  # 10th / 50th / 90th percentile of its channel scales

    def cosine(self, part: str) -> tuple[float, float] | None:
        o = self.objective.get(part)
        if not o or o[2] <= 0 or o[3] <= 0:
            return None
        norm = math.sqrt(o[2] * o[3])
        return o[0] / norm, o[1] / norm

    def summary_lines(self) -> list[str]:
        iterated = self.method in ("rebasin", "legacy") and self.iterations > 1
        own = ", ".join(f"{k} {v:g}" for k, v in self.params.items())
        label = METHODS[self.method].label
        if self.method == "rebasin" and self.matching == "activations":
            label = "Re-basin (activation matching)"
        lines = [f"Method: {label}" + (f" ({own})" if own else "") + f", alpha {self.alpha:g}"
                 + (f", {self.iterations} iterations" if iterated else "")
                 + f"; parts: {', '.join(PART_NAMES[p] for p in self.parts)}."]
        if self.blocks is not None:
            from .block_weights import BlockWeights, convention_for

            bw = BlockWeights(tuple(self.blocks), self.blocks_preset)
            ids = convention_for(bw.values).ids
            lines.append(f"Block weights (BASE, IN00-{ids[len(ids) // 2 - 1]}, M00, OUT00-{ids[-1]}): "
                         + (f"{bw.preset} = " if bw.preset else "") + bw.text().replace(",", ", ") + ".")
        if self.aligned:
            lines.append("B (and C, with B's permutation) were re-basin aligned to A before the method ran.")
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
                if self.matching == "activations" and cos is not None and cos[1] < cos[0]:
                    # Pairing units by their activations normally also brings the weights closer. When it moves
                    # them apart, A and B already lined up in weight space (fine-tunes of one base): there weight
                    # matching certifies that alignment and equals the weighted sum, while the deep units'
                    # activations no longer correspond and activation matching reorders them (measured:
                    # benchmarks/quality/RESULTS.md, "Activation matching misaligns fine-tunes of one base").
                    lines.append(f"Warning: activation matching made B's {PART_NAMES[part]} less like A's in weight "
                                 f"space than leaving it unpermuted ({cos[0]:.4f} -> {cos[1]:.4f}): these look like "
                                 "fine-tunes of one base, which weight matching (the default) keeps aligned; on such "
                                 "models activation matching merged worse than a weighted sum.")
            if self.matching == "activations":
                lines.append(f"Activation matching: UNet and text encoder units paired by the correlation of their "
                             f"activations on {self.activation_samples} seeded prompt(s) along A's DDIM trajectory "
                             f"({self.match_steps} run(s))" + (
                                 "; the VAE by weight matching." if "vae" in self.parts else "."))
            if self.matching == "weights" or "vae" in self.parts:
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
        if self.repaired_layers:
            lo, mid, hi = self.repair_scale
            lines.append(f"REPAIR: {self.repaired_layers} UNet layers rescaled to the parents' interpolated "
                         f"activation statistics on {self.repair_samples} seeded prompt(s) along A's DDIM trajectory; "
                         f"channel scales {lo:g} / {mid:g} / {hi:g} (10th / 50th / 90th percentile; above 1: the "
                         "blend's activations had shrunk).")
        if self.method == "legacy":
            lines.append("Legacy mode reproduces T0b1maru's re-basin_merger: every key is the weighted sum, except the "
                         "six UNet/VAE output GroupNorm vectors, which were re-matched and blended at each of the "
                         f"{self.iterations} iterations. It is not a function-preserving re-basin; use the "
                         "re-basin method for that.")
        if self.copied_from_a:
            lines.append(f"{_keys(self.copied_from_a)} outside the merged parts or unknown to the spec "
                         f"{'was' if self.copied_from_a == 1 else 'were'} copied from A unchanged.")
        if self.dropped_from_b:
            lines.append(f"{_keys(self.dropped_from_b)} only present in B "
                         f"{'was' if self.dropped_from_b == 1 else 'were'} not carried over.")
        if self.baked_vae:
            lines.append(f"VAE baked in from {self.baked_vae} (the VAE was not merged).")
        if self.kept_a_extra_channels:
            lines.append("A's extra UNet input channels (inpainting / instruct-pix2pix) were kept from A.")
        lines.append(f"Finished in {self.seconds:.1f} s.")
        return lines

    def to_dict(self) -> dict[str, object]:
        return asdict(self)



def accumulate_objective(acc: list[float], spec: ArchSpec[Any], key: str, get_a: TensorGetter, get_b: TensorGetter,
                          perms: Perms) -> None:
    """Add <A,B>, <A,pi(B)>, |A|^2, |B|^2 of one key (float64 dot products and running sums)."""
    a = get_a(key).float()
    b = get_b(key).float()
    accumulate(acc, a, b, permute_tensor(spec, key, b, perms))


# Elements widened to float64 at a time: the widened chunks stay in the CPU's cache for their dot products, where
# widening whole tensors would write and read back twice their fp32 size.
OBJECTIVE_CHUNK = 1 << 16


def accumulate(acc: list[float], a: torch.Tensor, b: torch.Tensor, pb: torch.Tensor) -> None:
    """Add one key's dot products, in float64 (every product of two fp32 values exactly, the sums rounded in
    float64), a chunk at a time: the chunks of A, B (and pi(B)) side by side, and their Gram matrix, one product that
    gives every dot product at once. The order of the float64 additions changes only the last few of ~16 digits,
    far below the STORED_DIGITS that reach the file."""
    if a.shape != b.shape:
        return  # an inpainting A's wider conv_in has no counterpart in B
    unpermuted = pb is b
    srcs = [t.reshape(-1) for t in ((a, b) if unpermuted else (a, b, pb))]
    gram = ChunkedGram(len(srcs), srcs[0].numel(), a.device)
    for lo in range(0, gram.n, gram.chunk):
        gram.add([src[lo:lo + gram.chunk] for src in srcs])
    gram.add_to(acc)


class ChunkedGram:
    """`accumulate`'s Gram matrix of 2 (A, B) or 3 (A, B, pi(B)) flattened tensors of `n` elements, fed one chunk
    of OBJECTIVE_CHUNK elements at a time, in order, by whoever holds them (the blend, while they are in the cache):
    the same float64 operations on the same values as `accumulate` on the whole tensors, so the same bits."""

    def __init__(self, rows: int, n: int, device: torch.device) -> None:
        self.n, self.chunk = n, OBJECTIVE_CHUNK
        self.width = min(n, self.chunk)
        self.buf = torch.empty(rows, self.width, dtype=torch.float64, device=device)
        self.rows = list(self.buf.unbind(0))  # views made once: thousands of chunks per key
        self.gram = torch.zeros(rows, rows, dtype=torch.float64, device=device)

    def add(self, chunks: list[torch.Tensor]) -> None:
        """The next chunk of each tensor (1-D, `chunk` elements but for the last, any float dtype)."""
        k = chunks[0].numel()
        if k == self.width:
            x, rows = self.buf, self.rows
        else:  # the last chunk
            x, rows = self.buf[:, :k], [row[:k] for row in self.rows]
        for row, chunk in zip(rows, chunks, strict=True):
            row.copy_(chunk)
        self.gram.addmm_(x, x.T)

    def add_to(self, acc: list[float]) -> None:
        """Add <A,B>, <A,pi(B)>, |A|^2, |B|^2 to `acc`."""
        g = self.gram.tolist()
        acc[0] += g[0][1]
        acc[1] += g[0][1] if len(g) == 2 else g[0][2]
        acc[2] += g[0][0]
        acc[3] += g[1][1]


# Significant digits of the measured floats stored in a file's metadata. A dot product's last bits depend on how
# many threads reduced it; rounding makes the same merge give the same bytes on any machine setting.
STORED_DIGITS = 9


def stored_float(x: float) -> float | None:
    """`x` rounded to STORED_DIGITS significant digits; None for NaN/Inf (not valid JSON)."""
    if not math.isfinite(x):
        return None
    return float(f"{x:.{STORED_DIGITS}g}")


def stored_diagnostics(d: Diagnostics) -> dict[str, object]:
    """What a file's metadata keeps of the diagnostics: no wall time, and thread-independent floats."""
    out = {k: v for k, v in d.to_dict().items() if k != "seconds"}
    out["objective"] = {p: [stored_float(x) for x in o] for p, o in d.objective.items()}
    return out


def _keys(n: int) -> str:
    return f"{n} key" if n == 1 else f"{n} keys"
