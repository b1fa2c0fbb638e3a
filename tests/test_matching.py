"""The assignment solvers and the exact shortcuts of weight matching."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from lib_rebasin.align.assignment import row_argmax_certificate, solve
from lib_rebasin.align.permute import inverse, is_identity, is_legal, permute_tensor, random_legal_perm
from lib_rebasin.align.weight_matching import weight_matching
from lib_rebasin.archspec import Structure
from lib_rebasin.io.checkpoint import open_checkpoint
from lib_rebasin.sd1.config import MINI
from lib_rebasin.sd1.spec import build_spec


@pytest.mark.parametrize("structure", [
    Structure(8),
    Structure(8, levels=(2,)),
    Structure(8, levels=(2, 4)),
    Structure(8, levels=(4,)),
    Structure(8, intervals=((0, 3), (3, 5), (5, 8))),
    Structure(8, levels=(2,), intervals=((0, 2), (2, 8))),
    Structure(8, shared_blocks=2),   # attention: 2 heads of 2 channels, q/k half then v/o half
    Structure(8, shared_blocks=1),
])
def test_structured_assignment_is_the_brute_force_optimum(structure: Structure) -> None:
    rng = np.random.default_rng(0)
    legal = [p for p in itertools.permutations(range(8)) if is_legal(structure, torch.tensor(p))]
    for _ in range(5):
        C = rng.normal(size=(8, 8))
        best = max(sum(C[i, p[i]] for i in range(8)) for p in legal)
        perm = solve(C, structure)
        assert is_legal(structure, torch.from_numpy(perm))
        assert sum(C[i, perm[i]] for i in range(8)) == pytest.approx(best, abs=1e-12)


def test_certificate_only_accepts_legal_permutations() -> None:
    C = torch.eye(4) + 0.1 * torch.randn(4, 4).abs() * 0
    assert torch.equal(row_argmax_certificate(C, Structure(4)), torch.arange(4))
    swapped = C[:, [1, 0, 2, 3]]       # row argmax = swap across a GroupNorm block boundary of size 1 -> legal
    assert row_argmax_certificate(swapped, Structure(4, levels=(2,))) is not None
    crossing = C[:, [2, 1, 0, 3]]      # moves channel 0 into block 1 alone: illegal for blocks of 2
    assert row_argmax_certificate(crossing, Structure(4, levels=(2,))) is None
    assert row_argmax_certificate(torch.ones(3, 3), Structure(3)) is None  # argmax not a permutation


def test_head_structure_needs_one_head_order_for_both_halves() -> None:
    heads = Structure(8, shared_blocks=2)
    assert is_legal(heads, torch.tensor([3, 2, 0, 1, 6, 7, 5, 4]))      # heads swapped in both halves
    assert not is_legal(heads, torch.tensor([2, 3, 0, 1, 4, 5, 6, 7]))  # q/k heads swapped, v/o heads not
    assert not is_legal(heads, torch.tensor([4, 5, 6, 7, 0, 1, 2, 3]))  # q/k channels sent into the v/o half
    assert not is_legal(heads, torch.tensor([1, 2, 0, 3, 4, 5, 6, 7]))  # a channel crosses heads


def _state(path: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as ck:
        return {k: ck.get(k) for k in ck.keys()}


@pytest.mark.parametrize("pair", ["independent", "shuffled"])
def test_shortcuts_give_the_same_permutations_as_the_plain_algorithm(models: dict[str, Path], pair: str) -> None:
    spec = build_spec(MINI)
    a, b = _state(models["a"]), _state(models[pair])
    groups = spec.groups_in(["te", "vae"])
    fast = weight_matching(spec, groups, a.__getitem__, b.__getitem__, max_sweeps=3, seed=3)
    plain = weight_matching(spec, groups, a.__getitem__, b.__getitem__, max_sweeps=3, seed=3,
                            certificate=False, skip_unchanged=False)
    assert fast.sweeps == plain.sweeps
    assert all(torch.equal(fast.perms[k], plain.perms[k]) for k in plain.perms)
    assert fast.solves < plain.solves


def test_planted_head_reorder_is_recovered(models: dict[str, Path]) -> None:
    """B is A with the heads of every attention reordered (and shuffled inside): matching undoes exactly that."""
    spec = build_spec(MINI)
    a = _state(models["a"])
    gen = torch.Generator().manual_seed(6)
    attn = [g for g in spec.groups_in(["unet", "te"]) if g.kind == "attention"]
    planted = {g.name: random_legal_perm(g.structure, gen) for g in attn}
    assert all(not torch.equal(p[:g.size // 2:g.head_dim], torch.arange(0, g.size // 2, g.head_dim))
               for g in attn for p in [planted[g.name]])  # whole heads move
    b = {k: permute_tensor(spec, k, v, planted) for k, v in a.items()}
    res = weight_matching(spec, spec.groups_in(["unet", "te"]), a.__getitem__, b.__getitem__, max_sweeps=3)
    assert res.converged
    for g in attn:
        assert torch.equal(res.perms[g.name], inverse(planted[g.name])), g.name
    assert all(is_identity(p) for n, p in res.perms.items() if n not in planted)


def test_bf16_screen_on_attention_groups(models: dict[str, Path]) -> None:
    """The screened estimate bounds the exact matrix inside both halves of an attention group, leaves the
    cross-half entries -inf (no legal permutation uses them), and certifies the same-base identity; with the screen
    forced on, matching a head-shuffled model gives the same permutations as without it."""
    from lib_rebasin.align.weight_matching import certified_argmax, cost_matrix, screened_cost_matrix

    spec = build_spec(MINI)
    a, fine = _state(models["a"]), _state(models["finetune"])
    g = spec.groups["te.layers.0.attn.heads"]
    cpu = torch.device("cpu")
    exact = cost_matrix(spec, g, a.__getitem__, fine.__getitem__, {}, cpu)
    est, err = screened_cost_matrix(spec, g, a.__getitem__, fine.__getitem__, {}, cpu)
    half = torch.arange(g.size) < g.size // 2
    inside = half[:, None] == half[None, :]
    assert bool(((est - exact).abs()[inside] <= err[inside]).all())
    assert bool((exact[~inside] == float("-inf")).all() and (est[~inside] == float("-inf")).all())
    assert torch.equal(certified_argmax(est, err, g.structure), torch.arange(g.size))
    attn = [h for h in spec.groups.values() if h.kind == "attention" and h.part == "te"]
    planted = {h.name: random_legal_perm(h.structure, torch.Generator().manual_seed(8)) for h in attn}
    b = {k: permute_tensor(spec, k, v, planted) for k, v in fine.items()}
    runs = [weight_matching(spec, attn, a.__getitem__, b.__getitem__, screen=screen) for screen in (True, False)]
    assert all(torch.equal(runs[0].perms[h.name], runs[1].perms[h.name]) for h in attn)
    assert all(torch.equal(runs[0].perms[h.name], inverse(planted[h.name])) for h in attn)
    assert sum(r.screened for r in runs[0].groups) > 0


def test_tolerance_stops_early_after_the_bulk_of_the_gain(models: dict[str, Path]) -> None:
    spec = build_spec(MINI)
    a, b = _state(models["a"]), _state(models["independent"])
    groups = spec.groups_in(["te", "vae"])
    strict = weight_matching(spec, groups, a.__getitem__, b.__getitem__, max_sweeps=8)
    loose = weight_matching(spec, groups, a.__getitem__, b.__getitem__, max_sweeps=8, tolerance=0.05)
    assert loose.converged and 2 <= loose.sweeps < strict.sweeps
    # the same first sweeps: the loose run is a prefix of the strict one
    moved = lambda r: sum(g.moved for g in r.groups)
    assert moved(loose) > 0.9 * moved(strict)
