"""Activation matching (Ainsworth et al. 2023, the paper's other method): align B to A by how its units *behave*.

Both models see the same inputs; a unit of B is matched to the unit of A whose activations it correlates with
best, one assignment per permutation group, under the group's legal (GroupNorm) structure. Unlike weight
matching, groups do not depend on each other (both models run unpermuted), so there is no coordinate ascent.

A group's *sites* are the outputs of the layers whose weights the group permutes along their output axis
(conv/linear weights, axis 0); where such a layer adds into a residual stream, its site is the stream after the
addition. `activation_matching` runs both models on the same inputs with the core's own forward pass of their
architecture (`sd1/forward.py` or `sdxl/forward.py`, inputs from `sd1/activation_inputs.py` and
`sdxl/activation_inputs.py`; `forward_support.forward_of` picks them), takes each site's channel window (`Slot.offset`,
`Slot.length`) and feeds it, batch by batch, to `Correlation` with the units it carries (`Slot.start`: an attention
group's q/k sites carry its first half, its v sites the second). The permutation it returns is applied with
`permute.permute_tensor` like any other. Only UNet and text-encoder groups have a forward pass here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from ..archspec import ArchSpec, Group, Slot
from ..errors import RebasinError
from ..forward_layers import Layers, TensorGetter, channels_last
from ..io.model_input import ModelConfig
from ..memory import returned_heap, trim_free_pages
from ..parts import part_of
from ..sd1 import activation_inputs as inputs
from .assignment import row_argmax_certificate, solve
from .forward_support import ArchForward, check_forward_supported, forward_of
from .permute import Perms


def layer_of(key: str) -> str:
    """The layer a weight key belongs to, as the forward pass names its output (OpenCLIP's fused `in_proj_weight`
    is layer `in_proj`)."""
    return key.removesuffix(".weight").removesuffix("_weight")


def sites(spec: ArchSpec[Any], group: Group) -> list[Slot]:
    """The layer outputs that carry `group`'s units: its slots on the output axis of a >= 2-D layer weight (not
    CLIP-G's `text_projection`, stored input axis first)."""
    return [s for s in group.slots if s.axis == 0 and len(spec.shapes[s.key]) >= 2 and s.key.endswith("weight")]


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
        count = torch.zeros(self.n, self.n, dtype=torch.float64)
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
            count[lo:hi, lo:hi] += m
        return total.div_(count.clamp_min_(1))


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


def match(groups: Iterable[Group], correlations: dict[str, Correlation],
          on_group: Callable[[int, int, str], None] | None = None, release: bool = False) -> Perms:
    """The legal permutation of each group (with collected activations) maximising the summed correlation.
    `release`: each group's correlation is taken out of `correlations` once its value is computed, so the sums
    are freed group by group while the larger assignments run."""
    perms: Perms = {}
    groups = list(groups)
    for i, g in enumerate(groups):
        if on_group is not None:
            on_group(i, len(groups), g.name)
        corr = correlations.pop(g.name, None) if release else correlations.get(g.name)
        if corr is None or not corr.sites:
            continue
        value = corr.value()
        del corr
        # A legal row-argmax is the optimum (no solve needed): the rule for same-base and planted pairs.
        best = row_argmax_certificate(value, g.structure)
        perms[g.name] = best if best is not None else torch.from_numpy(solve(value.numpy(), g.structure))
    return perms


# -- running both models ---------------------------------------------------------------------------------------
Progress = Callable[[float, str], None]  # (fraction of the matching done, what runs now)
# The share of activation matching's progress for the assignments after the forward passes: the forward passes of
# both models take most of the time, the assignments of every group the rest.
_ASSIGN_SHARE = 0.3


def needs_forward(spec: ArchSpec[Any], groups: Iterable[Group]) -> tuple[bool, bool]:
    """Whether the text encoder / the UNet must run to observe these groups' sites."""
    keys = [s.key for g in groups for s in sites(spec, g)]
    return any(part_of(k) == "te" for k in keys), any(part_of(k) == "unet" for k in keys)


def check_supported(a: ModelConfig, b: ModelConfig) -> None:
    check_forward_supported(a, b, "Activation matching", "Use matching = weights for it.")


# The correlation sums one pass over the models holds: groups past it are matched in further passes over the same
# seeded inputs, which give the same activations, so the permutations are those of a single pass. Full-size SD 1.5's
# sums fit in one pass; full-size SDXL's (each of its 70 GEGLU hidden groups alone has two 5120 x 5120 sums) take
# several.
SUMS_PER_PASS = 4 << 30


def sums_bytes(spec: ArchSpec[Any], group: Group, rows: Mapping[str, int] | None = None) -> int:
    """The memory of a group's correlation sums (`Correlation`, fp32). Without `rows`, a units-by-units matrix per
    site (the most a site can hold); with each layer's rows over a pass (`layer_rows`), what each site holds: a
    site whose rows stay under half its units keeps only its rows (`_Site`), and a layer the forward pass does not
    report (a ResBlock's skip convolution, one term of the stream its block reports) holds nothing."""
    total = 0
    for s in sites(spec, group):
        m = s.length
        r = None if rows is None else rows.get(layer_of(s.key))
        if rows is not None and r is None:
            continue
        held = 2 * r * m if r is not None and r < m // 2 else m * m
        total += (held + 4 * m) * 4
    return total


def passes(spec: ArchSpec[Any], groups: Iterable[Group], budget: int = SUMS_PER_PASS,
           rows: Mapping[str, int] | None = None) -> list[list[Group]]:
    """`groups` in order, split into runs whose correlation sums (`sums_bytes`) fit `budget` (a larger group gets a
    pass alone)."""
    out: list[list[Group]] = [[]]
    used = 0
    for g in groups:
        n = sums_bytes(spec, g, rows)
        if out[-1] and used + n > budget:
            out.append([])
            used = 0
        out[-1].append(g)
        used += n
    return out


@torch.no_grad()
def layer_rows(spec: ArchSpec[Any], get_b: TensorGetter, *, samples: int, device: torch.device = torch.device("cpu"),
               latent_size: int = inputs.LATENT_SIZE) -> dict[str, int]:
    """Each layer's rows (positions times inputs) over one pass of `correlations`, from one run of B's text encoder
    and one UNet call on a single input with its empty prompt: a pass runs the text encoder once on the prompts and
    the UNet on every prompt and the empty one at each of the trajectory's timesteps."""
    c = spec.config
    fwd = forward_of(c)
    rows: dict[str, int] = {}
    scale = 1

    def count(name: str, out: torch.Tensor) -> None:
        rows[name] = rows.get(name, 0) + scale * (out.numel() // out.shape[1 if out.dim() == 4 else -1])

    layers = Layers(get_b, count, device, streams=True)
    gen = torch.Generator().manual_seed(0)  # the values do not matter, only the shapes
    ctx = fwd.text_encoder(c, layers, fwd.prompts(c, samples, gen).to(device))
    x = inputs.noise(c, 1, gen, latent_size).to(device).repeat(2, 1, 1, 1)
    scale = samples * len(inputs.TIMESTEPS)
    fwd.unet(c, layers, x, torch.full((2,), inputs.TIMESTEPS[0], dtype=torch.long, device=device), ctx[[0, -1]])
    return rows


@torch.no_grad()
def activation_matching(spec: ArchSpec[Any], groups: Iterable[Group], get_a: TensorGetter, get_b: TensorGetter, *,
                        samples: int, seed: int, device: torch.device = torch.device("cpu"),
                        progress: Progress | None = None, latent_size: int = inputs.LATENT_SIZE,
                        sums_per_pass: int = SUMS_PER_PASS) -> Perms:
    """Permutations of B onto A from their activations on the same inputs (`activation_inputs`).

    Where the sums might not fit one pass, each layer's rows are counted first (`layer_rows`, the cost of one UNet
    call) so that the passes are planned for what the sites will hold: the deep layers and the text encoders see
    fewer rows than they have units and keep only their rows, which takes fewer passes than the bound."""
    todo = [g for g in groups if sites(spec, g)]
    runs = passes(spec, todo, sums_per_pass)
    rows = None
    if len(runs) > 1:
        rows = layer_rows(spec, get_b, samples=samples, device=device, latent_size=latent_size)
        runs = passes(spec, todo, sums_per_pass, rows)
    perms: Perms = {}
    for k, run in enumerate(runs):
        def step(fraction: float, message: str, k: int = k) -> None:
            if progress is not None:
                progress((k + fraction) / len(runs), message if len(runs) == 1 else f"{message} (pass {k + 1}/"
                                                                                  f"{len(runs)})")

        # The sums stay allocated while both models' layer outputs come and go around them: a merge's reused heap
        # would keep every hole those leave resident (`memory.returned_heap`).
        with returned_heap():
            corr = correlations(spec, run, get_a, get_b, samples=samples, seed=seed, device=device,
                                progress=step if progress is not None else None, latent_size=latent_size, rows=rows)

        def on_group(i: int, n: int, name: str) -> None:
            step(1 - _ASSIGN_SHARE + _ASSIGN_SHARE * i / n, f"activation matching: assignment {i + 1}/{n} {name}")

        perms.update(match(run, corr, on_group, release=True))
        del corr
        trim_free_pages()
    return perms


@torch.no_grad()
def correlations(spec: ArchSpec[Any], groups: Iterable[Group], get_a: TensorGetter, get_b: TensorGetter, *,
                 samples: int, seed: int, device: torch.device = torch.device("cpu"),
                 progress: Progress | None = None, latent_size: int = inputs.LATENT_SIZE,
                 rows: Mapping[str, int] | None = None) -> dict[str, Correlation]:
    """Each group's correlation between A's and B's units on the matching inputs (what `match` assigns on; the
    quality benchmark's `where` reads them to show how well units correspond).

    Both models run layer for layer from their getters (nothing is loaded whole). A's layer outputs of one batch
    (`PROMPTS_PER_BATCH` prompts, each also with the empty prompt) are held until B's same layer has run; B's are
    folded into the correlations as they appear, so memory is one batch of A's activations plus the correlation
    sums.

    With each layer's rows over the pass (`layer_rows`), every site the pass observes is allocated before the
    models run (`Correlation.reserve`); the correlations are the same with or without them."""
    groups = [g for g in groups if sites(spec, g)]
    c = spec.config
    fwd = forward_of(c)
    need_unet = needs_forward(spec, groups)[1]  # the text encoder always runs: it makes the UNets' contexts
    # layer -> [(group, site index, channel offset, window length, first unit carried)]
    wanted: dict[str, list[tuple[str, int, int, int, int]]] = {}
    for g in groups:
        for i, s in enumerate(sites(spec, g)):
            wanted.setdefault(layer_of(s.key), []).append((g.name, i, s.offset, s.length, s.start))
    corr = {g.name: Correlation(g.size, torch.float32) for g in groups}
    for name, entries in wanted.items():
        r = None if rows is None else rows.get(name)
        for group, site, _, n, start in entries:
            if r is not None:
                corr[group].reserve(site, start, n, r, device)
    held: dict[str, torch.Tensor] = {}

    def hold(name: str, out: torch.Tensor) -> None:
        if name in wanted:
            held[name] = out

    def fold(name: str, out: torch.Tensor) -> None:
        if name not in wanted:
            return
        fa, fb = channels_last(held.pop(name)), channels_last(out)
        for group, site, off, n, start in wanted[name]:
            corr[group].update(site, fa[:, off:off + n], fb[:, off:off + n], start)

    # Residual streams are observed after each writer's addition (forward.Layers' streams mode): on the quality
    # benchmark's wider pairs, matching the stream sums instead of the writers' own outputs lowered the barrier
    # (benchmarks/quality/RESULTS.md).
    layers_a = Layers(get_a, hold, device, streams=True)
    layers_b = Layers(get_b, fold, device, streams=True)
    gen = torch.Generator().manual_seed(seed)
    ids = fwd.prompts(c, samples, gen).to(device)
    if progress is not None:
        progress(0.0, "activation matching: text encoder")
    # Each UNet is conditioned on its own text encoder's contexts (B's are in B's coordinates).
    ctx_a = fwd.text_encoder(c, layers_a, ids)
    ctx_b = fwd.text_encoder(c, layers_b, ids)
    trim_free_pages()
    if need_unet:
        _denoise(fwd, c, layers_a, layers_b, (ctx_a, ctx_b), inputs.noise(c, samples, gen, latent_size).to(device),
                 progress)
    _check_finite(spec, groups, corr)
    return corr


def _check_finite(spec: ArchSpec[Any], groups: list[Group], corr: dict[str, Correlation]) -> None:
    """Refuse activations that were not finite anywhere they were observed (checked once, on the sums every
    row entered, instead of on every layer output)."""
    for g in groups:
        bad = corr[g.name].nonfinite()
        if bad:
            name = layer_of(sites(spec, g)[min(bad)].key)
            raise RebasinError(f"Activations at {name} became non-finite on the matching inputs; the models "
                               "cannot be activation matched (use matching = weights).")


# Prompts run through the UNets as one batch (each with its empty prompt): every layer's weights are read and
# widened once per batch instead of once per prompt, and the deep layers' few positions make larger products.
# Memory: a batch's activations of A are held until B's same layer has run.
PROMPTS_PER_BATCH = 4


def _batches(samples: int) -> list[range]:
    return [range(lo, min(samples, lo + PROMPTS_PER_BATCH)) for lo in range(0, samples, PROMPTS_PER_BATCH)]


def _denoise(fwd: ArchForward, c: Any, layers_a: Layers, layers_b: Layers, ctx: tuple[Any, Any],
             x: torch.Tensor, progress: Progress | None) -> None:
    """Model A's DDIM trajectory from x; at every step both models see each x_t with its prompt and the empty one,
    `PROMPTS_PER_BATCH` prompts at a time."""
    batches = _batches(x.shape[0])
    ts = inputs.TIMESTEPS
    total = len(ts) * len(batches) + 1
    done = 1

    def guided_eps(k: int, t: int, x: torch.Tensor) -> torch.Tensor:
        nonlocal done
        eps = torch.empty_like(x)
        for j, rows in enumerate(batches):
            if progress is not None:
                progress((1 - _ASSIGN_SHARE) * done / total,
                         f"activation matching: t={t} ({k + 1}/{len(ts)})"
                         + (f", prompts {j + 1}/{len(batches)}" if len(batches) > 1 else ""))
            n = len(rows)
            xi = x[rows.start:rows.stop].repeat(2, 1, 1, 1)  # [the prompts | the empty prompt], as `guided` takes
            tt = torch.full((2 * n,), t, dtype=torch.long, device=x.device)
            cond = list(rows) + [-1] * n
            eps[rows.start:rows.stop] = inputs.guided(fwd.unet(c, layers_a, xi, tt, ctx[0][cond]), n)
            fwd.unet(c, layers_b, xi, tt, ctx[1][cond])
            # The holes the batch's activations leave in the heap below the sums, given back now instead of staying
            # resident for the whole pass (the next batch faults them in again).
            trim_free_pages()
            done += 1
        return eps

    inputs.ddim_trajectory(c, x, guided_eps)
