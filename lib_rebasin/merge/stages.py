"""Where each stage of one merge sits on its progress bar.

A merge shows one bar (`progress.Reporter`): reading the headers, matching, REPAIR, hashing the inputs, writing.
The shares are fixed before the merge starts, from what it will do, so the bar only moves forward and its ETA
holds. They are estimates of each stage's usual share of the time, not measurements of this merge.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..align.weight_matching import MatchProgress
from ..progress import Reporter

# Reading and checking the inputs' headers is quick whatever the merge does.
HEADERS_READ = 0.02


@dataclass(frozen=True)
class MergeBar:
    """The fraction of the bar at which each stage ends; writing fills the rest, up to 1."""
    matched: float   # matching (or, without alignment, building the per-key blend: nothing to wait for)
    repaired: float  # REPAIR's forward passes (equal to `matched` without REPAIR)
    hashed: float    # hashing the inputs for the provenance metadata


# With alignment, matching (many assignment problems, or forward passes of both models) dominates the merge;
# REPAIR's forward passes and hashing the inputs are small beside it.
_ALIGNED = MergeBar(matched=0.80, repaired=0.84, hashed=0.85)
# Without it, the merge is reading, blending and writing tensors, so hashing the inputs (reading each file whole)
# is a fair share of it; with REPAIR, whose forward passes cost more than a hash, most of that share is REPAIR's.
_UNALIGNED = MergeBar(matched=0.03, repaired=0.13, hashed=0.15)


def merge_bar(aligned: bool, repair: bool) -> MergeBar:
    """The stage ends for a merge that does (or does not) align B and repair the result."""
    bar = _ALIGNED if aligned else _UNALIGNED
    return bar if repair else MergeBar(bar.matched, bar.matched, bar.hashed)


# Activation matching's share of its stage when the VAE is weight matched after it: the forward passes of both
# models are nearly all the time; the VAE's weight matching gets the end of the stage.
ACTIVATIONS_SHARE = 0.9


def sweep_progress(report: Reporter) -> Callable[[MatchProgress], None]:
    """Weight matching's progress as a fraction of its (unknown) number of sweeps: half in sweep 1, then ever
    closer to the end."""
    def on_progress(p: MatchProgress) -> None:
        report("matching", 1 - 1 / (p.sweep + p.index / p.total),
               f"matching: sweep {p.sweep}, group {p.index}/{p.total} {p.group}")

    return on_progress
