"""The quality benchmark's `where` driver: the join-block moves it measures as a lever are legal (every GroupNorm
partition of a straddled stream maps onto itself), never pair worse than the spec's own structure, and find a
planted block move exactly."""

from __future__ import annotations

import numpy as np

from benchmarks.quality.layout import sd_config
from benchmarks.quality.where import join_blocks, preserves_partitions, with_block_moves
from lib_rebasin.align.assignment import solve
from lib_rebasin.sd1.spec import build_spec


def test_join_block_moves_are_legal_and_find_a_planted_move() -> None:
    spec = build_spec(sd_config(64))
    straddled = [g for g in spec.groups_in(["unet"]) if g.structure.intervals]
    assert straddled and any(g.name == "unet.input_blocks.0" for g in straddled)
    rng = np.random.default_rng(0)
    for g in straddled:
        v = rng.standard_normal((g.size, g.size))
        perm = with_block_moves(v, g)
        assert sorted(perm) == list(range(g.size)) and preserves_partitions(perm, g), g.name
        spec_perm = solve(v, g.structure)
        assert preserves_partitions(spec_perm, g)
        rows = np.arange(g.size)
        assert v[rows, perm].sum() >= v[rows, spec_perm].sum() - 1e-9, g.name

    # A planted move of two identical join blocks (which the spec's intervals forbid) is found exactly.
    g = next(g for g in straddled if g.name == "unet.input_blocks.0")
    blocks = join_blocks(g)
    patterns = [b[2] for b in blocks]
    common = max(set(patterns), key=patterns.count)      # width 64: four blocks of 12 channels alike
    first, second = [b for b in blocks if b[2] == common][:2]
    planted = np.arange(g.size)
    n = first[1] - first[0]
    planted[first[0]:first[1]] = np.arange(second[0], second[0] + n)
    planted[second[0]:second[1]] = np.arange(first[0], first[0] + n)
    assert preserves_partitions(planted, g) and not np.array_equal(solve(np.eye(g.size)[:, planted], g.structure),
                                                                   planted)
    assert np.array_equal(with_block_moves(np.eye(g.size)[:, planted], g), planted)
    # A move the partitions do not allow is caught: two adjacent channels of different join blocks swapped.
    bad = np.arange(g.size)
    bad[[first[1] - 1, first[1]]] = bad[[first[1], first[1] - 1]]
    assert not preserves_partitions(bad, g)
