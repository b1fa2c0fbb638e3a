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
from ..memory import own_mappings, trim_free_pages
from ..parts import part_of
from ..sd1 import activation_inputs as inputs
from .assignment import row_argmax_certificate, solve
from .correlation import Correlation
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

        def on_group(i: int, n: int, name: str) -> None:
            step(1 - _ASSIGN_SHARE + _ASSIGN_SHARE * i / n, f"activation matching: assignment {i + 1}/{n} {name}")

        # The sums stay allocated while both models' layer outputs, then the assignments' units-by-units
        # temporaries, come and go around them: in a merge's reused heap they would keep every hole those leave
        # resident, so the pass allocates outside it (`memory.own_mappings`), except the layers' weights, read, used
        # and freed at once (`Layers.w`).
        with own_mappings():
            corr = correlations(spec, run, get_a, get_b, samples=samples, seed=seed, device=device,
                                progress=step if progress is not None else None, latent_size=latent_size, rows=rows)
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
            # What the batch left free in the heap (its weights' buffers, small blocks) given back now instead of
            # staying resident for the whole pass.
            trim_free_pages()
            done += 1
        return eps

    inputs.ddim_trajectory(c, x, guided_eps)
