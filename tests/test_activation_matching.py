"""Activation matching (lib_rebasin.align.activation_matching): recovers a planted legal permutation from the units'
activations, and only ever returns permutations the group's GroupNorm structure allows."""

from __future__ import annotations

import torch

from lib_rebasin.align import activation_matching as am
from lib_rebasin.sd1.config import MINI
from lib_rebasin.align.permute import inverse, is_legal, random_legal_perm
from lib_rebasin.sd1.spec import build_spec


def _groups_of_every_structure():
    spec = build_spec(MINI)
    groups = list(spec.groups.values())
    s = lambda g: g.structure  # noqa: E731
    picked = {"free": next(g for g in groups if s(g) == type(s(g))(g.size)),
              "blocks": next(g for g in groups if s(g).levels and not s(g).intervals),
              "intervals": next(g for g in groups if s(g).intervals),
              "heads": next(g for g in groups if s(g).shared_blocks and g.size // 2 > s(g).shared_blocks)}
    return spec, picked


def test_every_group_has_an_activation_site() -> None:
    spec = build_spec(MINI)
    assert all(am.sites(spec, g) for g in spec.groups.values())


def test_planted_permutation_is_recovered_under_each_structure() -> None:
    spec, picked = _groups_of_every_structure()
    g = torch.Generator().manual_seed(0)
    corr, planted = {}, {}
    for kind, group in picked.items():
        n = group.size
        acts_a = [torch.randn(500, n, generator=g) * torch.rand(n, generator=g) + torch.randn(n, generator=g)
                  for _ in range(2)]
        pi = random_legal_perm(group.structure, g)
        c = am.Correlation(n)
        for site, a in enumerate(acts_a):
            # B's unit j behaves like A's unit pi[j] (its own scale and offset: correlation ignores both).
            b = 3.0 * a[:, pi] - 1.0
            if kind == "heads":  # an attention group's sites each carry one half: q/k, then v/o
                lo, hi = (0, n // 2) if site == 0 else (n // 2, n)
                c.update(site, a[:, lo:hi], b[:, lo:hi], lo)
            else:
                c.update(site, a, b)
        corr[group.name], planted[group.name] = c, pi
    perms = am.match(picked.values(), corr)
    for kind, group in picked.items():
        assert torch.equal(perms[group.name], inverse(planted[group.name])), kind


def test_unrelated_activations_still_give_legal_permutations() -> None:
    spec, picked = _groups_of_every_structure()
    g = torch.Generator().manual_seed(1)
    corr = {}
    for group in picked.values():
        c = am.Correlation(group.size)
        c.update(0, torch.randn(64, group.size, generator=g), torch.randn(64, group.size, generator=g))
        corr[group.name] = c
    perms = am.match(picked.values(), corr)
    for group in picked.values():
        assert is_legal(group.structure, perms[group.name]), group.name
    # Groups without collected activations are left out (the identity).
    assert am.match(picked.values(), {}) == {}
