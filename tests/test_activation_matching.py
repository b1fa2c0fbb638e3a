"""Activation matching (lib_rebasin.align.activation_matching): recovers a planted legal permutation from the units'
activations, and only ever returns permutations the group's GroupNorm structure allows."""

from __future__ import annotations

import pytest
import torch

from lib_rebasin.align import activation_matching as am
from lib_rebasin.align.correlation import Correlation
from lib_rebasin.align.permute import inverse, is_legal, random_legal_perm
from lib_rebasin.errors import RebasinError
from lib_rebasin.sd1.config import MINI, TINY
from lib_rebasin.sd1.spec import build_spec
from lib_rebasin.synthetic_weights import random_tensor


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
        c = Correlation(n)
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
        c = Correlation(group.size)
        c.update(0, torch.randn(64, group.size, generator=g), torch.randn(64, group.size, generator=g))
        corr[group.name] = c
    perms = am.match(picked.values(), corr)
    for group in picked.values():
        assert is_legal(group.structure, perms[group.name]), group.name
    # Groups without collected activations are left out (the identity).
    assert am.match(picked.values(), {}) == {}


def _pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    n = a.shape[1]
    return torch.corrcoef(torch.cat([a, b], 1).T)[:n, n:]


def test_correlation_is_the_same_however_its_rows_arrive() -> None:
    """Rows are added to a site's cross sum in batches (and a site whose rows stay under half its units keeps only
    its rows): any split of the same rows gives the Pearson correlation of all of them."""
    g = torch.Generator().manual_seed(2)
    for units, rows in ((40, 600), (400, 60)):  # many rows per unit (batched sums), few (rows only)
        a = torch.randn(rows, units, generator=g, dtype=torch.float64) * 3 + 5
        b = a[:, torch.randperm(units, generator=g)] + torch.randn(rows, units, generator=g, dtype=torch.float64)
        whole, split = Correlation(units), Correlation(units)
        whole.update(0, a, b)
        for lo in range(0, rows, 7):
            split.update(0, a[lo:lo + 7], b[lo:lo + 7])
        assert (split.sites[0].sab is None) == (rows < units // 2)
        assert torch.allclose(whole.value(), _pearson(a, b), atol=1e-10)
        assert torch.allclose(split.value(), _pearson(a, b), atol=1e-10)
        assert torch.equal(split.value(), split.value())  # reading it leaves it as it was


def test_reserved_sites_give_exactly_the_unreserved_correlation() -> None:
    """A site allocated for its counted rows (`Correlation.reserve`: preallocated sums, pending rows written into one
    block) gives bit for bit what a site growing batch by batch gives: rows-only sites with their exact count,
    with more rows than counted (staying rows-only, or reaching half their units), cross-sum sites (whose rows fill
    the block of half their units, or overflow it in one batch), and a site with no count, in one fp32 Correlation
    fed channel windows of wider activations as the forward pass gives them."""
    g = torch.Generator().manual_seed(3)
    # site: (start, units, rows per batch, batches, counted rows or None)
    layout = {0: (0, 64, 5, 4, 20), 1: (0, 64, 5, 4, 12), 2: (0, 64, 6, 3, None), 3: (32, 32, 7, 6, 42),
              4: (0, 64, 8, 7, 56), 5: (0, 64, 8, 6, 10), 6: (16, 48, 3, 5, 15)}
    plain, reserved = Correlation(64, torch.float32), Correlation(64, torch.float32)
    for site, (start, m, _, _, counted) in layout.items():
        if counted is not None:
            reserved.reserve(site, start, m, counted)
    for k in range(max(n for _, _, _, n, _ in layout.values())):
        for site, (start, m, per_batch, batches, _) in reversed(layout.items()):  # first rows in another order
            if k < batches:
                wide_a = torch.randn(per_batch, m + 10, generator=g) * 2 + 3
                wide_b = torch.randn(per_batch, m + 10, generator=g) - 1
                for c in (plain, reserved):
                    c.update(site, wide_a[:, 5:5 + m], wide_b[:, 5:5 + m], start)
    assert list(plain.sites) == list(reserved.sites)
    kinds = [(s.sab is None, s.block is not None) for s in reserved.sites.values()]
    assert (True, True) in kinds and (False, False) in kinds and (True, False) in kinds  # rows only, cross sum
    for site in plain.sites:
        p, r = plain.sites[site], reserved.sites[site]
        assert p.rows == r.rows and all(torch.equal(x, y) for x, y in zip(p.sums, r.sums, strict=True)), site
        assert torch.equal(p.cross(), r.cross()), site
    assert torch.equal(plain.value(), reserved.value())
    assert reserved.sites[0].nbytes() == (2 * 20 * 64 + 4 * 64) * 4  # what `sums_bytes` plans for it


def test_value_in_place_is_exactly_the_out_of_place_formula_and_release_frees_the_sums() -> None:
    """`value` works in place on private copies (fp64 temporaries of 0.8 GB each for full-size SDXL's GEGLU groups):
    bit for bit the out-of-place formula, for fp32 and fp64 sums (whose cross sum it must not change), with
    overlapping windows; `match(release=True)` gives the same permutations and drops each group's sums."""
    g = torch.Generator().manual_seed(4)

    def reference(c: Correlation) -> torch.Tensor:
        total = torch.zeros(c.n, c.n, dtype=torch.float64)
        count = torch.zeros(c.n, c.n, dtype=torch.float64)
        for s in c.sites.values():
            sa, sb, saa, sbb = (x.double().cpu() for x in s.sums)
            sab = s.cross().double().cpu()
            m = s.rows
            ma, mb = sa / m, sb / m
            cov = sab / m - torch.outer(ma, mb)
            std_a = (saa / m - ma * ma).clamp_min(0).sqrt().clamp_min(1e-12)
            std_b = (sbb / m - mb * mb).clamp_min(0).sqrt().clamp_min(1e-12)
            lo, hi = s.start, s.start + s.m
            total[lo:hi, lo:hi] += m * cov / torch.outer(std_a, std_b)
            count[lo:hi, lo:hi] += m
        return total / count.clamp_min(1)

    group = _groups_of_every_structure()[1]["free"]
    n = group.size
    made = {}
    # (start, units, rows, batches) per site: overlapping windows (counted entry by entry), one shared window, and
    # two disjoint halves, one seen by two sites (each window's block divided by its rows)
    layouts = ([(0, n, 7, 9), (0, n // 2, 5, 3), (n // 4, n // 2, 9, 8)], [(0, n, 7, 9), (0, n, 5, 3)],
               [(0, n // 2, 7, 9), (n // 2, n // 2, 5, 3), (n // 2, n // 2, 9, 8)])
    for layout in layouts:
        for dtype in (torch.float32, torch.float64):
            c = made[dtype] = Correlation(n, dtype)
            for site, (start, m, per_batch, batches) in enumerate(layout):
                for _ in range(batches):
                    c.update(site, torch.randn(per_batch, m, generator=g) * 3 + 1,
                             torch.randn(per_batch, m, generator=g), start)
            expected = reference(c)
            kept = [None if s.sab is None else s.sab.clone() for s in c.sites.values()]
            assert torch.equal(c.value(), expected), (layout, dtype)
            assert all(k is None or torch.equal(k, s.sab) for k, s in zip(kept, c.sites.values(), strict=True))
    values = {group.name: made[torch.float32]}
    kept_perm = am.match([group], dict(values))
    assert torch.equal(am.match([group], values, release=True)[group.name], kept_perm[group.name]) and not values


def test_correlations_with_counted_rows_are_exactly_those_without() -> None:
    """Every site reserved from `layer_rows`' count before the models run: the same correlations, bit for bit."""
    spec, a, b = _tiny_pair()
    groups = [g for g in spec.groups_in(("unet", "te")) if am.sites(spec, g)]
    rows = am.layer_rows(spec, b.__getitem__, samples=3, latent_size=8)
    run = lambda rows: am.correlations(spec, groups, a.__getitem__, b.__getitem__, samples=3, seed=0,  # noqa: E731
                                       latent_size=8, rows=rows)
    plain, reserved = run(None), run(rows)
    assert any(s.block is not None for c in reserved.values() for s in c.sites.values())
    assert all(not c._reserved for c in reserved.values())  # the count named every site the forward pass reports
    for g in groups:
        assert list(plain[g.name].sites) == list(reserved[g.name].sites), g.name
        assert torch.equal(plain[g.name].value(), reserved[g.name].value()), g.name
    one, other = am.match(groups, plain), am.match(groups, reserved)
    assert one.keys() == other.keys() and all(torch.equal(one[k], other[k]) for k in one)


def test_non_finite_activations_are_found_at_their_site() -> None:
    c = Correlation(8, torch.float32)
    for bad in (float("nan"), float("inf"), 1e30):  # the last: finite, but its square overflows the sums
        a = torch.randn(5, 4)
        a[2, 1] = bad
        c.update(len(c.sites), torch.randn(5, 4), torch.randn(5, 4), 4)
        c.update(len(c.sites), a, torch.randn(5, 4))
    assert c.nonfinite() == [1, 3, 5]


def _tiny_pair():
    spec = build_spec(TINY)
    return spec, *({k: random_tensor(k, s, seed) for k, s in spec.shapes.items()} for seed in (1, 2))


def test_prompts_batched_or_one_at_a_time_give_the_same_permutations(monkeypatch: pytest.MonkeyPatch) -> None:
    spec, a, b = _tiny_pair()
    groups = spec.groups_in(("unet", "te"))

    def run(per_batch: int):
        monkeypatch.setattr(am, "PROMPTS_PER_BATCH", per_batch)
        return am.activation_matching(spec, groups, a.__getitem__, b.__getitem__, samples=3, seed=0, latent_size=8)

    one, two = run(1), run(2)
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


def test_activations_that_overflow_are_refused_naming_the_layer() -> None:
    spec, a, b = _tiny_pair()
    key = "model.diffusion_model.middle_block.0.in_layers.2.weight"
    b[key] = b[key] * 1e30
    with pytest.raises(RebasinError, match=r"^Activations at model\.diffusion_model\.middle_block\.0\.") as err:
        am.activation_matching(spec, spec.groups_in(("unet",)), a.__getitem__, b.__getitem__, samples=1, seed=0,
                               latent_size=8)
    assert "\n" not in str(err.value)


def test_passes_planned_from_counted_rows_give_one_passs_permutations() -> None:
    """SD 1.x at a budget a third of its sums' bound: the rows are counted (the samples' batches need not fill
    PROMPTS_PER_BATCH), the plan takes no more passes than the bound's, and the permutations are one pass's."""
    spec, a, b = _tiny_pair()
    groups = [g for g in spec.groups_in(("unet", "te")) if am.sites(spec, g)]
    budget = sum(am.sums_bytes(spec, g) for g in groups) // 3 + 1
    rows = am.layer_rows(spec, b.__getitem__, samples=3, latent_size=8)
    assert 1 < len(am.passes(spec, groups, budget, rows)) <= len(am.passes(spec, groups, budget)) >= 3
    seen: list[str] = []

    def run(per_pass: int, progress=None):
        return am.activation_matching(spec, groups, a.__getitem__, b.__getitem__, samples=3, seed=0, latent_size=8,
                                      sums_per_pass=per_pass, progress=progress)

    one, several = run(am.SUMS_PER_PASS), run(budget, lambda f, m: seen.append(m))
    assert one.keys() == several.keys() and all(torch.equal(one[k], several[k]) for k in one)
    assert seen[-1].endswith(f"/{len(am.passes(spec, groups, budget, rows))})")
