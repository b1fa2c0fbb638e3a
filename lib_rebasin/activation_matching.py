"""Activation matching (Ainsworth et al. 2023, the paper's other method): align B to A by how its units *behave*.

Both models see the same inputs; a unit of B is matched to the unit of A whose activations it correlates with
best, one assignment per permutation group, under the group's legal (GroupNorm) structure. Unlike weight
matching, groups do not depend on each other (both models run unpermuted), so there is no coordinate ascent.

The core has no forward pass, so the caller collects the activations: a group's *sites* are the outputs of the
layers whose weights the group permutes along their output axis (conv/linear weights, axis 0); the caller runs
both models on the same inputs, takes each site's channel window (`Slot.offset`, `Slot.length`) and feeds it,
batch by batch, to `Correlation` with the units it carries (`Slot.start`: an attention group's q/k sites carry its
first half, its v sites the second). The permutation it returns is applied with `permute.permute_tensor` like any other.
"""

from __future__ import annotations

from typing import Iterable

import torch

from .assignment import solve
from .permute import Perms
from .spec import ArchSpec, Group, Slot


def sites(spec: ArchSpec, group: Group) -> list[Slot]:
    """The layer outputs that carry `group`'s units: its slots on the output axis of a >= 2-D weight."""
    return [s for s in group.slots if s.axis == 0 and len(spec.shapes[s.key]) >= 2]


class Correlation:
    """Running Pearson correlation between A's and B's units at one group, averaged over its sites.

    Each site is standardised on its own (the branch outputs of one residual stream have different scales),
    then the sites' correlation matrices are averaged, weighted by their sample counts. A site may carry a window
    of the group's units (`start`); each entry averages the sites that see it, and entries no site sees (across
    the two halves of an attention group, which no legal permutation uses) stay 0."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.stats: dict[int, list[torch.Tensor | int]] = {}
        self.starts: dict[int, int] = {}

    def update(self, site: int, a: torch.Tensor, b: torch.Tensor, start: int = 0) -> None:
        """a, b: (samples, m) activations of the same inputs at site `site`, units [start, start + m)."""
        m = a.shape[-1]
        assert start + m <= self.n and self.starts.setdefault(site, start) == start, (site, start, m)
        a, b = a.reshape(-1, m).double(), b.reshape(-1, m).double()
        s = self.stats.get(site)
        upd = [a.sum(0), b.sum(0), (a * a).sum(0), (b * b).sum(0), a.T @ b, a.shape[0]]
        self.stats[site] = upd if s is None else [x + y for x, y in zip(s, upd)]

    def value(self) -> torch.Tensor:
        total = torch.zeros(self.n, self.n, dtype=torch.float64)
        count = torch.zeros(self.n, self.n, dtype=torch.float64)
        for site, (sa, sb, saa, sbb, sab, m) in self.stats.items():
            ma, mb = sa / m, sb / m
            cov = sab / m - torch.outer(ma, mb)
            std_a = (saa / m - ma * ma).clamp_min(0).sqrt().clamp_min(1e-12)
            std_b = (sbb / m - mb * mb).clamp_min(0).sqrt().clamp_min(1e-12)
            lo, hi = self.starts[site], self.starts[site] + len(sa)
            total[lo:hi, lo:hi] += m * cov / torch.outer(std_a, std_b)
            count[lo:hi, lo:hi] += m
        return total / count.clamp_min(1)


def match(groups: Iterable[Group], correlations: dict[str, Correlation]) -> Perms:
    """The legal permutation of each group (with collected activations) maximising the summed correlation."""
    perms: Perms = {}
    for g in groups:
        corr = correlations.get(g.name)
        if corr is None or not corr.stats:
            continue
        perms[g.name] = torch.from_numpy(solve(corr.value().numpy(), g.structure))
    return perms
