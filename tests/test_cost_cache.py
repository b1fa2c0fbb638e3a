"""Cost matrices kept between visits and updated by the columns that moved (`align/cost_cache.py`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lib_rebasin.align.cost import cost_matrix
from lib_rebasin.align.cost_cache import CostCache
from lib_rebasin.align.permute import random_legal_perm
from lib_rebasin.align.weight_matching import weight_matching
from lib_rebasin.io.checkpoint import open_checkpoint
from lib_rebasin.sd1.config import MINI
from lib_rebasin.sd1.spec import build_spec


def _state(path: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as ck:
        return {k: ck.get(k) for k in ck.keys()}  # noqa: SIM118 (a checkpoint, not a dict)


def _small_groups(spec):
    """The text encoder's groups and the UNet's first input blocks: every kind of slot (attention halves, GroupNorm
    blocks, conv kernels, a residual stream) at small sizes."""
    first = {f"unet.input_blocks.{i}" for i in range(4)}
    return spec.groups_in(["te"]) + [g for g in spec.groups_in(["unet"])
                                     if g.part == "unet" and ".".join(g.name.split(".")[:3]) in first]


def _partly_moved(perm: torch.Tensor, structure, gen: torch.Generator) -> torch.Tensor:
    """`perm` with a legal permutation applied to it: what a neighbour's later visit does."""
    return perm[random_legal_perm(structure, gen)]


def test_updated_matrices_equal_full_recomputation(models: dict[str, Path]) -> None:
    """Every group's kept matrix, updated after its neighbours moved (all of them, some of them, none; attention
    halves, GroupNorm blocks, conv kernels, text-encoder and VAE slots alike), equals the matrix computed in full
    within fp32 rounding, and the updates really ran (no silent full recomputation)."""
    spec = build_spec(MINI)
    a, b = _state(models["a"]), _state(models["independent"])
    groups = _small_groups(spec)
    cpu = torch.device("cpu")
    gen = torch.Generator().manual_seed(3)
    cache = CostCache(spec, spec.groups_in(["unet", "te", "vae"]), 1 << 30)
    perms: dict[str, torch.Tensor] = {}
    for g in groups:  # the first visit: computed in full, bit for bit the plain matrix
        assert torch.equal(cache.cost(g, a.__getitem__, b.__getitem__, perms, cpu),
                           cost_matrix(spec, g, a.__getitem__, b.__getitem__, perms, cpu))
    for step in range(3):
        for i, g in enumerate(groups):
            if (i + step) % 3 == 0:  # a third of the groups move each step, the others keep their permutation
                perms[g.name] = _partly_moved(perms.get(g.name, torch.arange(g.size)), g.structure, gen)
        for g in groups:
            got = cache.cost(g, a.__getitem__, b.__getitem__, perms, cpu)
            want = cost_matrix(spec, g, a.__getitem__, b.__getitem__, perms, cpu)
            finite = torch.isfinite(want)
            assert torch.equal(finite, torch.isfinite(got)), g.name
            scale = want[finite].abs().max()
            assert float((got[finite] - want[finite]).abs().max()) <= 1e-5 * float(scale), g.name
    assert cache.stats.updated > 0 and cache.stats.unchanged > 0


def test_a_matrix_is_recomputed_in_full_when_most_columns_moved(models: dict[str, Path]) -> None:
    spec = build_spec(MINI)
    a, b = _state(models["a"]), _state(models["independent"])
    g = spec.groups["te.layers.0.mlp"]
    neighbours = [h for h in spec.groups_in(["te"]) if h.name != g.name]
    cache = CostCache(spec, spec.groups_in(["unet", "te", "vae"]), 1 << 30)
    cpu = torch.device("cpu")
    cache.cost(g, a.__getitem__, b.__getitem__, {}, cpu)
    flipped = {h.name: torch.arange(h.size).flip(0) for h in neighbours}
    got = cache.cost(g, a.__getitem__, b.__getitem__, flipped, cpu)
    assert cache.stats.full == 2 and cache.stats.updated == 0
    assert torch.equal(got, cost_matrix(spec, g, a.__getitem__, b.__getitem__, flipped, cpu))


def test_budget_bounds_the_kept_matrices(models: dict[str, Path]) -> None:
    spec = build_spec(MINI)
    a, b = _state(models["a"]), _state(models["independent"])
    groups = spec.groups_in(["te"])
    budget = 3 * max(g.size for g in groups) ** 2 * 4
    cache = CostCache(spec, groups, budget)
    for g in groups:
        cache.cost(g, a.__getitem__, b.__getitem__, {}, torch.device("cpu"))
    assert 0 < cache.used <= budget and 0 < len(cache.entries) < len(groups)


def test_matching_with_kept_matrices_finds_the_same_permutations(models: dict[str, Path]) -> None:
    """An independent pair, run until a sweep improves nothing: kept-and-updated matrices give the permutations
    of matrices computed in full on every visit (they differ only by fp32 rounding)."""
    spec = build_spec(MINI)
    a, b = _state(models["a"]), _state(models["independent"])
    groups = _small_groups(spec)
    runs = [weight_matching(spec, groups, a.__getitem__, b.__getitem__, max_sweeps=30, seed=1, cache_bytes=cb)
            for cb in (0, 1 << 30)]
    assert runs[0].sweeps == runs[1].sweeps > 2
    assert all(torch.equal(runs[0].perms[k], runs[1].perms[k]) for k in runs[0].perms)
    assert runs[1].cost.updated > 0 and runs[1].cost.work < runs[0].cost.work


def test_solving_on_another_thread_makes_the_sequential_steps(models: dict[str, Path],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Assignments solved while the next cost matrices are computed: the same permutations, gains, progress events
    and visits as solving each on the spot, on an independent pair (every visit solves) and a shuffled fine-tune;
    with every later visit computed ahead of a running solve (these matrices are small) and with the bytes held
    ahead bounded below some of them."""
    import lib_rebasin.align.weight_matching as wm

    spec = build_spec(MINI)
    a = _state(models["a"])
    groups = _small_groups(spec)
    for pair in ("independent", "shuffled"):
        b = _state(models[pair])
        seen: list[list[tuple]] = []
        runs = []
        for overlap, ahead in ((False, wm._AHEAD_BYTES), (True, wm._AHEAD_BYTES), (True, 1 << 16)):
            monkeypatch.setattr(wm, "_AHEAD_BYTES", ahead)
            events: list[tuple] = []
            seen.append(events)
            runs.append(weight_matching(
                spec, groups, a.__getitem__, b.__getitem__, max_sweeps=4, seed=2, cache_bytes=0, overlap=overlap,
                progress=lambda p, ev=events: ev.append((p.sweep, p.index, p.group, p.changed_this_sweep)),
                after_visit=lambda ev=events: ev.append(("visit",))))
        assert seen[0] == seen[1] == seen[2] and len(seen[0]) > len(groups)
        for run in runs[1:]:
            assert runs[0].sweeps == run.sweeps
            assert all(torch.equal(runs[0].perms[k], run.perms[k]) for k in runs[0].perms)
            assert [(g.gain, g.solves, g.certified) for g in runs[0].groups] == \
                [(g.gain, g.solves, g.certified) for g in run.groups]
