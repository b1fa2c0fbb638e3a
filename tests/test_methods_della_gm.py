"""DELLA (MagPrune) and the geometric median: exact properties of the two pure functions, on small tensors."""

from __future__ import annotations

import itertools

import pytest
import torch

from lib_rebasin.methods import (
    METHODS,
    dare_drop,
    dare_ties,
    della,
    geometric_median,
    key_generator,
    magprune,
    weighted_geometric_median,
)

ROW = torch.tensor([0.1, -0.5, 2.0, -3.0, 0.01, 1.0, -0.2, 0.7])
COPIES = 40_000                       # identical rows: each column's keep rate is one probability, measured


def _rng(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _expected_keep(row: torch.Tensor, p: float, eps: float) -> torch.Tensor:
    """(1 - p) + eps (r - 1/2), r the entry's magnitude rank in its row scaled to [0, 1], clipped to [0, 1]."""
    n = row.numel()
    rank = row.abs().argsort().argsort().to(torch.float64)
    return ((1 - p) + eps * (rank / (n - 1) - 0.5)).clamp(0, 1)


# -- DELLA -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("p", [0.0, 0.1, 1 / 3, 0.5, 0.9, 0.99])
def test_magprune_with_eps_zero_is_dare_bit_for_bit(p: float) -> None:
    tau = torch.randn(50, 3, 3, generator=_rng(1))
    assert torch.equal(magprune(tau, p, 0.0, _rng(7)), dare_drop(tau, p, _rng(7)))


def test_della_with_eps_zero_is_dare_ties_bit_for_bit() -> None:
    a, b, c = (torch.randn(16, 4, 3, 3, generator=_rng(s)) for s in (1, 2, 3))
    params = {"dare_p": 0.7, "della_eps": 0.0, "ties_scale": 1.3}
    assert torch.equal(della(a, b, c, 0.3, params, key_generator(5, "k")),
                       dare_ties(a, b, c, 0.3, params, key_generator(5, "k")))


def test_magprune_keeps_larger_entries_more_often_and_preserves_the_expected_value() -> None:
    p, eps = 0.5, 0.4
    out = magprune(ROW.repeat(COPIES, 1), p, eps, _rng(3))
    kept = (out != 0).to(torch.float64).mean(0)
    want = _expected_keep(ROW, p, eps)
    sigma = (want * (1 - want) / COPIES).sqrt()
    assert (kept - want).abs().max() < 5 * sigma.max()
    order = ROW.abs().argsort()
    assert torch.all(kept[order].diff() > 0)                      # strictly more often, the larger |entry|
    assert abs(float(kept.mean()) - (1 - p)) < 0.01               # the mean drop rate is p
    # survivors are rescaled by 1 / keep probability: the mean over draws is the entry itself
    spread = ROW.abs().to(torch.float64) * ((1 - want) / want / COPIES).sqrt()
    assert torch.all((out.to(torch.float64).mean(0) - ROW).abs() < 5 * spread + 1e-9)
    survivors = out[:, 2][out[:, 2] != 0]
    torch.testing.assert_close(survivors, torch.full_like(survivors, 2.0 / (1 - p + eps * (6 / 7 - 0.5))))


def test_magprune_ranks_within_each_row_of_a_conv_weight() -> None:
    # rows (the first axis) 1000x apart in scale keep entries at the same rates: ranks are per row, not per tensor
    small, large = ROW.reshape(2, 2, 2), 1000 * ROW.reshape(2, 2, 2)
    tau = torch.stack([small, large]).repeat(COPIES // 2, 1, 1, 1)
    kept = (magprune(tau, 0.5, 0.4, _rng(4)) != 0).to(torch.float64).reshape(COPIES // 2, 2, 8).mean(0)
    want = _expected_keep(ROW, 0.5, 0.4)
    assert (kept - want).abs().max() < 0.015


def test_magprune_negative_eps_favours_small_entries_and_clipping_stays_finite() -> None:
    kept = (magprune(ROW.repeat(COPIES, 1), 0.5, -0.4, _rng(5)) != 0).to(torch.float64).mean(0)
    order = ROW.abs().argsort()
    assert torch.all(kept[order].diff() < 0)
    # p + eps/2 > 1 for the smallest entries: their keep probability is clipped to 0, they are never kept
    out = magprune(ROW.repeat(1000, 1), 0.95, 0.3, _rng(6))
    assert torch.isfinite(out).all()
    assert torch.all(out[:, ROW.abs().argsort()[:2]] == 0)
    assert (out != 0).any()


@pytest.mark.parametrize("shape", [(), (1,), (0, 4), (3, 0, 2)])
def test_magprune_scalars_and_empty_tensors(shape: tuple[int, ...]) -> None:
    tau = torch.full(shape, 2.0)
    out = magprune(tau, 0.5, 0.2, _rng(1))
    assert out.shape == tau.shape and torch.isfinite(out).all()
    assert torch.all((out == 0) | (out == 2.0 / 0.5))      # a row of one entry has the mean keep probability


def test_della_same_seed_same_bytes_other_seed_differs() -> None:
    a, b, c = (torch.randn(32, 40, generator=_rng(s)) for s in (1, 2, 3))
    params = {"dare_p": 0.8, "della_eps": 0.2, "ties_scale": 1.0}
    first = della(a, b, c, 0.5, params, key_generator(11, "model.diffusion_model.x"))
    again = della(a, b, c, 0.5, params, key_generator(11, "model.diffusion_model.x"))
    other = della(a, b, c, 0.5, params, key_generator(12, "model.diffusion_model.x"))
    assert first.numpy().tobytes() == again.numpy().tobytes()
    assert not torch.equal(first, other)


def test_della_with_b_equal_c_and_a_equal_c_returns_c() -> None:
    c = torch.randn(8, 8, generator=_rng(1))
    out = della(c.clone(), c.clone(), c, 0.4, {"dare_p": 0.9, "della_eps": 0.1, "ties_scale": 1.0}, _rng())
    assert torch.equal(out, c)


# -- geometric median --------------------------------------------------------------------------------------------

def _objective(y: torch.Tensor, points: list[torch.Tensor], weights: list[float]) -> float:
    return sum(w * float((y - x).norm()) for w, x in zip(weights, points))


@pytest.mark.parametrize("w", [0.5, 0.2, 0.7, 0.999])
def test_median_of_two_points_lies_on_their_segment_at_the_heavier_one(w: float) -> None:
    x, y = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([3.0, 1.0, -1.0])
    m = weighted_geometric_median([x, y], [1 - w, w])
    t = float((m - x) @ (y - x) / (y - x).norm() ** 2)
    torch.testing.assert_close(m, x + t * (y - x), rtol=0, atol=1e-5)      # on the line through x and y
    assert -1e-6 <= t <= 1 + 1e-6
    # the minimiser of (1-w)|m-x| + w|m-y| is the heavier point; at equal weights every point between is one,
    # and the iteration stays at its start, the mean: why the method adds C as a third point
    assert t == pytest.approx(0.5 if w == 0.5 else float(w > 0.5), abs=1e-5)


def test_median_of_identical_points_is_that_point_and_of_zeros_is_zero() -> None:
    x = torch.randn(5, 7, generator=_rng(2))
    assert torch.equal(weighted_geometric_median([x, x.clone(), x.clone()], [0.2, 0.3, 0.5]), x)
    zero = weighted_geometric_median([torch.zeros(4), torch.zeros(4)], [0.5, 0.5])
    assert torch.equal(zero, torch.zeros(4))


def test_median_matches_a_brute_force_minimiser_in_the_plane() -> None:
    points = [torch.tensor(v) for v in ([0.0, 0.0], [2.0, 0.1], [0.3, 1.7], [1.5, 1.2])]
    weights = [1.0, 0.6, 0.8, 0.5]
    m = weighted_geometric_median(points, weights)
    step = 0.005
    xs = torch.arange(-0.5, 2.5 + step / 2, step, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(xs, xs, indexing="ij"), -1).reshape(-1, 2)
    cost = sum(w * (grid - x.to(torch.float64)).norm(dim=1) for w, x in zip(weights, points))
    best = grid[cost.argmin()]
    assert _objective(m, points, weights) <= float(cost.min()) + 1e-6
    assert float((m.to(torch.float64) - best).norm()) < 2 * step
    # the Fermat point of a triangle with angles under 120 degrees sees every side under 120 degrees
    tri = weighted_geometric_median(points[:3], [1.0, 1.0, 1.0])
    for i, j in itertools.combinations(range(3), 2):
        u, v = points[i] - tri, points[j] - tri
        assert float(u @ v / (u.norm() * v.norm())) == pytest.approx(-0.5, abs=1e-4)


def test_a_point_heavier_than_the_pull_of_the_others_is_the_median() -> None:
    points = [torch.zeros(3), torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])]
    m = weighted_geometric_median(points, [2.0, 1.0, 1.0])          # 2 >= |e1 + e2| = 1.41
    assert float(m.norm()) < 1e-6
    assert not torch.isnan(m).any()


def test_geometric_median_method_ends_and_middle() -> None:
    c = torch.randn(6, 5, generator=_rng(1))
    a, b = c + torch.randn(6, 5, generator=_rng(2)), c + torch.randn(6, 5, generator=_rng(3))
    params: dict[str, object] = {}
    torch.testing.assert_close(geometric_median(a, b, c, 0.0, params, _rng()), a)
    torch.testing.assert_close(geometric_median(a, b, c, 1.0, params, _rng()), b)
    # at alpha 0.5 the three weights are equal: the plain geometric median of A, B and C
    mid = geometric_median(a, b, c, 0.5, params, _rng())
    torch.testing.assert_close(mid, weighted_geometric_median([a, b, c], [1.0, 1.0, 1.0]))
    for other in (a, b, c, (a + b) / 2, (a + b + c) / 3):
        assert _objective(mid, [a, b, c], [1, 1, 1]) <= _objective(other, [a, b, c], [1, 1, 1]) + 1e-5
    # near the switch to a vertex, where Weiszfeld converges slowest, it still beats every nearby point
    for alpha in (0.15, 0.25, 0.35):
        weights = [1 - alpha, alpha, 0.5]
        m = geometric_median(a, b, c, alpha, params, _rng())
        best = _objective(m, [a, b, c], weights)
        for s in range(20):
            nudge = 1e-3 * torch.randn(6, 5, generator=_rng(100 + s))
            assert best <= _objective(m + nudge, [a, b, c], weights) + 1e-6


def test_geometric_median_with_zero_task_vectors() -> None:
    c = torch.randn(4, 4, generator=_rng(1))
    params: dict[str, object] = {}
    assert torch.equal(geometric_median(c.clone(), c.clone(), c, 0.5, params, _rng()), c)   # untouched keys
    b = c + torch.randn(4, 4, generator=_rng(2))
    out = geometric_median(c.clone(), b, c, 0.5, params, _rng())          # A - C = 0: two of three votes at C
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, c, rtol=0, atol=1e-5)


def test_the_new_methods_are_declared_last_with_their_parameters() -> None:
    della_info, gm_info = list(METHODS.values())[-2:]
    assert (della_info.name, della_info.fn, della_info.random, della_info.needs_c) == ("della", della, True, True)
    assert [p.name for p in della_info.params] == ["dare_p", "della_eps", "ties_scale"]
    assert (gm_info.name, gm_info.fn, gm_info.random, gm_info.needs_c) == ("geometric_median", geometric_median,
                                                                            False, True)
    assert gm_info.params == ()
