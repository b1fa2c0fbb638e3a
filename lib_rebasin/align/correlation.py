"""The running correlation between two models' units that activation matching assigns on (`Correlation`): sums
over every row of activations both models produced on the same inputs, kept in as little memory as their rows
allow, and allocated once where the rows are counted beforehand."""

from __future__ import annotations

from itertools import pairwise

import torch


class Correlation:
    """Running Pearson correlation between A's and B's units at one group, averaged over its sites.

    Each site is standardised on its own (the branch outputs of one residual stream have different scales),
    then the sites' correlation matrices are averaged, weighted by their sample counts. A site may carry a window
    of the group's units (`start`); each entry averages the sites that see it, and entries no site sees (across
    the two halves of an attention group, which no legal permutation uses) stay 0. Sums are taken around the
    first batch's means, so that fp32 sums (half the memory of fp64: full-size SD 1.5 has 5 GB of fp64 sums) do
    not lose the covariance to cancellation.

    The cross sum (units x units) is the costly one. A site's rows are kept until they fill a batch (`_Site`):
    the deep, narrow-image layers give few rows per input but thousands of units, and adding each input's few
    rows to a units-by-units sum would rewrite the whole sum for little arithmetic. A site whose rows never
    outnumber half its units keeps only its rows (less memory than the sum) and is multiplied out in `value`."""

    def __init__(self, n: int, dtype: torch.dtype = torch.float64) -> None:
        self.n = n
        self.dtype = dtype
        self.sites: dict[int, _Site] = {}
        self._reserved: dict[int, _Site] = {}  # sites allocated before their first rows (`reserve`)

    def reserve(self, site: int, start: int, m: int, rows: int, device: torch.device = torch.device("cpu")) -> None:
        """Allocate site `site`'s storage before its first `update`, for `rows` rows over the run (`layer_rows`):
        the sums, and the block its pending rows are written into (`_Site`). Everything the site keeps is then
        allocated at once, before the forward passes' short-lived activations, instead of piece by piece between
        them (where the allocator cannot give the freed space around it back). The values are the same as
        without it; a site that gets more rows than reserved grows as an unreserved one does."""
        assert start + m <= self.n and site not in self.sites, (site, start, m)
        self._reserved[site] = _Site(start, m, self.dtype, rows, device)

    def update(self, site: int, a: torch.Tensor, b: torch.Tensor, start: int = 0) -> None:
        """a, b: (samples, m) activations of the same inputs at site `site`, units [start, start + m)."""
        m = a.shape[-1]
        s = self.sites.get(site)
        if s is None:
            assert start + m <= self.n, (site, start, m)
            # Sites enter `sites` at their first rows, reserved or not: `value` adds them in that order.
            reserved = self._reserved.pop(site, None)
            s = self.sites[site] = reserved if reserved is not None else _Site(start, m, self.dtype)
        assert s.start == start and s.m == m, (site, start, m)
        s.add(a.reshape(-1, m).to(self.dtype), b.reshape(-1, m).to(self.dtype))

    def nonfinite(self) -> list[int]:
        """The sites where an activation was NaN or infinite, or so large that its square overflowed: their
        running sums (every row enters them) are then not finite."""
        return [i for i, s in self.sites.items() if not all(bool(torch.isfinite(x).all()) for x in s.sums)]

    def value(self) -> torch.Tensor:
        # In place on private fp64 copies (the same operations in the same order as out of place): a full-size SDXL
        # GEGLU group is 10240 units, so each units-by-units fp64 temporary is 0.8 GB.
        total = torch.zeros(self.n, self.n, dtype=torch.float64)
        rows: dict[tuple[int, int], int] = {}  # each window's rows over its sites
        for s in self.sites.values():
            sa, sb, saa, sbb = (x.double().cpu() for x in s.sums)
            m = s.rows
            ma, mb = sa / m, sb / m  # means of the shifted values: covariance and deviations ignore the shift
            cov = s.cross().to(device="cpu", dtype=torch.float64, copy=True).div_(m).sub_(torch.outer(ma, mb))
            std_a = (saa / m - ma * ma).clamp_min(0).sqrt().clamp_min(1e-12)
            std_b = (sbb / m - mb * mb).clamp_min(0).sqrt().clamp_min(1e-12)
            lo, hi = s.start, s.start + s.m
            total[lo:hi, lo:hi] += cov.mul_(m).div_(torch.outer(std_a, std_b))
            del cov
            rows[lo, hi] = rows.get((lo, hi), 0) + m
        return _averaged(total, rows)


def _averaged(total: torch.Tensor, rows: dict[tuple[int, int], int]) -> torch.Tensor:
    """`total` divided, entry by entry, by the rows of the sites that see the entry (1 where none does), in place.
    The sites of a group share one window or have windows that do not overlap (an attention group's two halves):
    then each window's block is divided by its rows, without a units-by-units count (0.8 GB of fp64 for a
    full-size SDXL GEGLU group); overlapping windows are counted entry by entry. Either way each entry is divided
    by the same whole number, so the values are the same."""
    if any(a[1] > b[0] for a, b in pairwise(sorted(rows))):
        count = torch.zeros_like(total)
        for (lo, hi), m in rows.items():
            count[lo:hi, lo:hi] += m
        return total.div_(count.clamp_min_(1))
    for (lo, hi), m in rows.items():
        total[lo:hi, lo:hi].div_(max(m, 1))
    return total


class _Site:
    """One site's sums around the first batch's means: per-unit sums and sums of squares of both models (added at
    once), and the cross sum A^T B, whose rows wait in `pending` until there are enough to add them in one
    multiplication (or, while fewer than half the units, all of them: `cross` then multiplies them out).

    The site keeps its memory for the whole run while both models' activations come and go around it, so it is
    allocated once where it can be: the sums are added in place, and a site reserved for a number of rows
    (`Correlation.reserve`) writes its pending rows into one block of those rows (of at most half its units: the
    most it holds before its cross sum exists), which it gives up once the cross sum exists. Rows that do not fit
    the block (more than counted) wait as separate tensors, as they do without a block; the rows, and so the sums
    and products, are the same either way."""

    FLUSH_ROWS = 256  # rows per multiplication into an existing cross sum

    def __init__(self, start: int, m: int, dtype: torch.dtype, rows: int | None = None,
                 device: torch.device = torch.device("cpu")) -> None:
        self.start, self.m, self.dtype = start, m, dtype
        self.shift: tuple[torch.Tensor, torch.Tensor] | None = None
        self.sums: list[torch.Tensor] = []  # sa, sb, saa, sbb
        self.sab: torch.Tensor | None = None
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.pending_rows = 0
        self.rows = 0
        self.block: tuple[torch.Tensor, torch.Tensor] | None = None
        self.in_block = False  # `pending` is the block's first `pending_rows` rows
        if rows is not None:
            self.sums = [torch.empty(m, dtype=dtype, device=device) for _ in range(4)]
            held = min(rows, m // 2)
            if held > 0:
                self.block = (torch.empty(held, m, dtype=dtype, device=device),
                              torch.empty(held, m, dtype=dtype, device=device))

    def nbytes(self) -> int:
        """The memory the site holds now."""
        kept = [*self.sums, *([self.sab] if self.sab is not None else [])]
        kept += self.block if self.block is not None else ()
        block = {x.untyped_storage().data_ptr() for x in self.block or ()}
        kept += [x for pair in self.pending for x in pair if x.untyped_storage().data_ptr() not in block]
        return sum(x.numel() * x.element_size() for x in kept)

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        first = self.shift is None
        if self.shift is None:
            self.shift = (a.mean(0), b.mean(0))
        a, b = self._keep(a, b)
        upd = [a.sum(0), b.sum(0), (a * a).sum(0), (b * b).sum(0)]
        if not self.sums:
            self.sums = upd
        else:
            for x, y in zip(self.sums, upd, strict=True):
                if first:
                    x.copy_(y)
                else:
                    x.add_(y)
        self.rows += a.shape[0]
        if self.pending_rows >= (self.m // 2 if self.sab is None else min(self.m // 2, self.FLUSH_ROWS)):
            if self.sab is None:
                self.sab = torch.zeros(self.m, self.m, dtype=self.dtype, device=a.device)
            self._flush(self.sab)
            self.block = None  # the cross sum exists: later rows are flushed after a batch or two

    def _keep(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """a and b around the shift, added to the pending rows: written into the block while they fit it."""
        assert self.shift is not None
        n, p = a.shape[0], self.pending_rows
        if self.block is not None and (self.in_block or not self.pending) and p + n <= self.block[0].shape[0]:
            ka = torch.sub(a, self.shift[0], out=self.block[0][p:p + n])
            kb = torch.sub(b, self.shift[1], out=self.block[1][p:p + n])
            self.pending = [(self.block[0][:p + n], self.block[1][:p + n])]
            self.in_block = True
        else:
            ka, kb = a - self.shift[0], b - self.shift[1]
            self.pending.append((ka, kb))
            self.in_block = False
        self.pending_rows += n
        return ka, kb

    def cross(self) -> torch.Tensor:
        """The cross sum A^T B over every row (a site holding only rows multiplies them out each time: the object
        stays small)."""
        if self.sab is None:
            a, b = self._pending()
            return a.T @ b
        if self.pending:
            self._flush(self.sab)
        return self.sab

    def _pending(self) -> tuple[torch.Tensor, torch.Tensor]:
        if len(self.pending) == 1:
            return self.pending[0]
        return torch.cat([p[0] for p in self.pending]), torch.cat([p[1] for p in self.pending])

    def _flush(self, into: torch.Tensor) -> None:
        a, b = self._pending()
        into.addmm_(a.T, b)
        self.pending, self.pending_rows, self.in_block = [], 0, False
