"""The partial certificate (`align/partial_certificate.py`): it proves same-base visits from a small share of the
cost matrix, and wherever it holds the current permutation is the only optimum of the assignment problem, of the
exact matrix and of the fp32 one a visit would compute."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

import lib_rebasin.align.partial_certificate as pc
from lib_rebasin.align.partial_certificate import CurrentProof, prove_current
from lib_rebasin.align.permute import inverse, permute_tensor, random_legal_perm
from lib_rebasin.align.weight_matching import weight_matching
from lib_rebasin.archspec import Group, Slot
from lib_rebasin.io.checkpoint import open_checkpoint
from lib_rebasin.sd1.config import MINI
from lib_rebasin.sd1.spec import build_spec

CPU = torch.device("cpu")


def _state(path: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as ck:
        return {k: ck.get(k) for k in ck.keys()}


def _one_slot(n: int, head_dim: int = 0) -> tuple[object, Group]:
    """A group of n units on the rows of one tensor "w" (attention: q/k half on "w", v/o half on "v")."""
    if head_dim:
        half = n // 2
        g = Group("g", n, "unet", "attention", [Slot("w", 0, 0, 0, half), Slot("v", 0, 0, half, half)],
                  head_dim=head_dim)
        axes = {"w": {0: [("g", half, 0)]}, "v": {0: [("g", half, half)]}}
    else:
        g = Group("g", n, "unet", "free", [Slot("w", 0, 0, 0, n)])
        axes = {"w": {0: [("g", n, 0)]}}
    return type("Spec", (), {"axes": axes})(), g


def _exact(a: torch.Tensor, b: torch.Tensor, head_dim: int = 0) -> np.ndarray:
    C = (a.double() @ b.double().T).numpy()
    if head_dim:
        half = len(C) // 2
        C[:half, half:] = C[half:, :half] = -1e300
    return C


def _only_optimum(C: np.ndarray, cur: torch.Tensor) -> bool:
    """cur is an optimal assignment of C, and every single swap of two rows' columns loses (strictly)."""
    rows, cols = linear_sum_assignment(C, maximize=True)
    c = cur.numpy()
    value = C[np.arange(len(c)), c].sum()
    if C[rows, cols].sum() > value * (1 + 1e-12) + 1e-300:
        return False
    d = np.diag(C[:, c])  # C[i, cur(i)]
    swap = C[:, c] + C[:, c].T - d[:, None] - d[None, :]  # gain of exchanging rows i and j's columns
    np.fill_diagonal(swap, -np.inf)
    return bool((swap < 0).all())


def test_same_base_identity_is_proven_and_a_swapped_pair_is_not(models: dict[str, Path]) -> None:
    """Every visit of a same-base pair is proven (no full matrix, no solve), with the permutations of the full path;
    a current permutation with two units exchanged is never proven."""
    spec = build_spec(MINI)
    a, fine = _state(models["a"]), _state(models["finetune"])
    groups = spec.groups_in(["unet", "te", "vae"])
    # Re-read on each visit (a file on the CPU): the proof keeps the columns it needs from its first read.
    runs = [weight_matching(spec, groups, a.__getitem__, fine.__getitem__, partial=p, keep=(not p, not p))
            for p in (True, False)]
    assert all(torch.equal(runs[0].perms[g.name], runs[1].perms[g.name]) for g in groups)
    assert runs[0].certified == runs[1].certified == len(groups) and runs[0].solves == 0
    proof = CurrentProof(spec, a.__getitem__, fine.__getitem__, CPU)
    for g in groups[:40]:
        ident = torch.arange(g.size)
        assert proof.prove(g, {}, ident), g.name
        swapped = ident.clone()
        swapped[[0, 1]] = swapped[[1, 0]]
        if g.kind == "attention":
            swapped = ident.clone()  # a legal exchange: the first two heads, in both halves
            h, half = g.head_dim, g.size // 2
            for lo in (0, half):
                swapped[lo:lo + 2 * h] = torch.cat([ident[lo + h:lo + 2 * h], ident[lo:lo + h]])
        assert not proof.prove(g, {}, swapped), g.name


def test_the_reused_matrix_is_written_over_not_read(models: dict[str, Path]) -> None:
    """The proof's matrix is reused from visit to visit without being zeroed: the first stage's products are written
    over every window. Storage that holds NaN from before (which any read of it would spread into the margins) gives
    the outcomes of fresh storage, for every group of the spec (attention halves included) and for a current
    permutation that is not optimal."""
    spec = build_spec(MINI)
    a, fine = _state(models["a"]), _state(models["finetune"])
    groups = spec.groups_in(["unet", "te", "vae"])
    assert any(g.kind == "attention" for g in groups)
    largest = max(g.size for g in groups) ** 2

    def outcomes(dirty: bool) -> list[bool]:
        proof = CurrentProof(spec, a.__getitem__, fine.__getitem__, CPU)
        out = []
        for g in groups:
            if dirty:
                proof.matrix = torch.full((largest,), float("nan"))
            swapped = torch.arange(g.size)
            if g.kind != "attention":
                swapped[[0, 1]] = swapped[[1, 0]]
            out += [proof.prove(g, {}, torch.arange(g.size)), proof.prove(g, {}, swapped)]
        return out

    clean = outcomes(False)
    assert outcomes(True) == clean
    assert all(clean[0::2]) and not any(clean[1::2][i] for i, g in enumerate(groups) if g.kind != "attention")


@pytest.mark.parametrize("shares", [None, (4096, 16, 2)])
def test_the_columns_kept_from_the_first_read_prove_what_the_whole_rows_do(
        models: dict[str, Path], monkeypatch: pytest.MonkeyPatch, shares: tuple[int, ...] | None) -> None:
    """A run's proof reads each key once for its statistics and keeps the columns the first share multiplies out,
    for every group the key belongs to: the same outcome as a proof that reads the whole rows on each visit. With
    a first share too small to prove most rows, the later shares read the whole rows again, with the same outcome."""
    if shares is not None:
        monkeypatch.setattr(pc, "SHARES", shares)
        monkeypatch.setattr(pc, "MIN_COLUMNS", 1)
    spec = build_spec(MINI)
    a, fine = _state(models["a"]), _state(models["finetune"])
    groups = spec.groups_in(["unet", "te", "vae"])
    reads: dict[str, int] = {}

    def counted(state: dict[str, torch.Tensor]) -> Callable[[str], torch.Tensor]:
        def get(key: str) -> torch.Tensor:
            reads[key] = reads.get(key, 0) + 1
            return state[key]
        return get

    proof = CurrentProof(spec, counted(a), counted(fine), CPU, groups)
    outcomes = [proof.prove(g, {}, torch.arange(g.size)) for g in groups]
    alone = [prove_current(spec, g, a.__getitem__, fine.__getitem__, {}, torch.arange(g.size), CPU) for g in groups]
    assert outcomes == alone and sum(outcomes) > len(groups) // 2
    assert not proof.kept  # released after each key's last planned visit
    matrices = {k for k in reads if a[k].dim() > 1}
    if shares is None:
        assert all(outcomes)
        assert all(reads[k] == 2 for k in matrices)  # once from A, once from B
    else:
        assert any(reads[k] > 2 for k in matrices)  # the whole rows again for a later share


def test_permuted_pair_is_proven_at_the_permutation_that_undoes_it(models: dict[str, Path]) -> None:
    """B is the fine-tune with every group permuted: at the inverse permutations (other axes permuted, the group
    itself moved) each group is proven, and any other single group's permutation is not."""
    spec = build_spec(MINI)
    a, fine = _state(models["a"]), _state(models["finetune"])
    gen = torch.Generator().manual_seed(3)
    groups = spec.groups_in(["te", "vae"])
    planted = {g.name: random_legal_perm(g.structure, gen) for g in groups}
    b = {k: permute_tensor(spec, k, v, planted) for k, v in fine.items()}
    undo = {k: inverse(p) for k, p in planted.items()}
    for g in groups:
        assert prove_current(spec, g, a.__getitem__, b.__getitem__, undo, undo[g.name], CPU), g.name
        assert not prove_current(spec, g, a.__getitem__, b.__getitem__, undo, torch.arange(g.size), CPU), g.name


def test_shuffled_pair_gives_the_plain_algorithms_permutations(models: dict[str, Path]) -> None:
    spec = build_spec(MINI)
    a, b = _state(models["a"]), _state(models["shuffled"])
    groups = spec.groups_in(["te", "vae"])
    fast = weight_matching(spec, groups, a.__getitem__, b.__getitem__, max_sweeps=4, seed=2)
    plain = weight_matching(spec, groups, a.__getitem__, b.__getitem__, max_sweeps=4, seed=2, certificate=False,
                            skip_unchanged=False)
    assert fast.sweeps == plain.sweeps
    assert all(torch.equal(fast.perms[k], plain.perms[k]) for k in plain.perms)


def test_a_small_share_proves_rows_of_unequal_norms(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows whose norms differ by up to 30 % are proven from 256 of 16384 columns: the bound does not pay for the
    largest row norm (a Cauchy-Schwarz row-argmax bound over the other 98 % of the columns could not hold)."""
    monkeypatch.setattr(pc, "SHARES", (64,))
    gen = torch.Generator().manual_seed(2)
    n, m = 64, 16384
    base = torch.randn(n, m, generator=gen) * (1 + 0.3 * torch.rand(n, 1, generator=gen))
    a = base + 0.05 * torch.randn(n, m, generator=gen)
    b = base + 0.05 * torch.randn(n, m, generator=gen)
    spec, g = _one_slot(n)
    cur = torch.arange(n)
    assert prove_current(spec, g, {"w": a}.__getitem__, {"w": b}.__getitem__, {}, cur, CPU)
    assert _only_optimum(_exact(a, b), cur)


@pytest.mark.parametrize("case", ["random", "spread", "swapped", "near_tie", "tie", "big_unit", "attention"])
def test_whatever_is_proven_is_the_only_optimum(case: str) -> None:
    """Adversarial pairs: whenever the proof holds, the current permutation is the float64 matrix's only optimum
    (checked with scipy's assignment and every single exchange). A swapped pair and an exact tie are never proven;
    a unit of large norm that beats a row's own partner in C (so row-argmax fails) is still proven optimal."""
    gen = torch.Generator().manual_seed(hash(case) % 1000)
    proven = refuted = 0
    for trial in range(40):
        n, m = (8, int(torch.randint(1, 3000, (1,), generator=gen))) if case == "random" else (16, 2048)
        head_dim = 2 if case == "attention" else 0
        scale = 1 + (0.5 if case == "spread" else 0.1) * torch.rand(n, 1, generator=gen)
        base = torch.randn(n, m, generator=gen) * scale
        if case == "big_unit":  # unit 5 larger and leaning towards unit 4: C[4, 5] > C[4, 4], yet 4 is 4's nearest
            base[5] = 1.6 * (0.7 * base[4] + 0.71 * base[5])
        noise = float(torch.rand(1, generator=gen)) * (2 if case == "random" else 0.2)
        a = base + noise * torch.randn(n, m, generator=gen)
        b = base + noise * torch.randn(n, m, generator=gen)
        cur = torch.arange(n)
        if case == "random" and trial % 2:
            cur = torch.randperm(n, generator=gen)
            b = b[inverse(cur)]  # unit cur(i) of B is row i's partner
        if case == "swapped":
            b[[3, 7]] = b[[7, 3]]
        if case in ("near_tie", "tie"):
            a[1], b[1] = a[0], b[0]  # rows 0 and 1 the same unit: identity and their exchange tie (nearly)
            if case == "near_tie":
                shift = 10.0 ** -(trial % 5) * torch.randn(m, generator=gen)  # unit 1 = unit 0 moved a little
                a[1], b[1] = a[1] + shift, b[1] + shift
        if case == "attention":
            cur = random_legal_perm(Group("g", n, "unet", "attention", head_dim=head_dim).structure, gen)
            b = b[inverse(cur)]
        spec, g = _one_slot(n, head_dim)
        half = n // 2
        ta = {"w": a[:half], "v": a[half:]} if head_dim else {"w": a}
        tb = {"w": b[:half], "v": b[half:]} if head_dim else {"w": b}
        ok = prove_current(spec, g, ta.__getitem__, tb.__getitem__, {}, cur, CPU)
        optimal = _only_optimum(_exact(a, b, head_dim), cur)
        assert optimal or not ok, trial
        proven += ok
        refuted += not optimal
    if case in ("swapped", "tie"):
        assert proven == 0 and refuted == 40
    elif case == "near_tie":
        assert 0 < proven < 40 - refuted  # the clearer pairs proven, the nearest ties left to the full path
    else:
        assert proven >= 10
    if case == "big_unit":
        C = _exact(a, b)
        assert C[4].argmax() == 5  # row-argmax is not the permutation, yet it was proven optimal


def test_unrelated_models_are_not_proven() -> None:
    gen = torch.Generator().manual_seed(4)
    spec, g = _one_slot(32)
    for _ in range(10):
        a, b = torch.randn(32, 1024, generator=gen), torch.randn(32, 1024, generator=gen)
        assert not prove_current(spec, g, {"w": a}.__getitem__, {"w": b}.__getitem__, {}, torch.arange(32), CPU)


@pytest.mark.parametrize("dtypes", [(torch.float16, torch.float16), (torch.float16, torch.float64),
                                    (torch.float32, torch.float64), (torch.bfloat16, torch.float32),
                                    (torch.float64, torch.float64)])
def test_row_statistics_are_within_their_bound_of_the_exact_sums(dtypes: tuple[torch.dtype, torch.dtype]) -> None:
    """Sums of a^2 and (a - b)^2 over every axis, within the stated relative bound of the exact ones, also when B is
    stored wider than fp32 and differs from A by far less than fp32 resolves (no rounding before the subtraction)."""
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(70, 9, 3, 3, generator=gen, dtype=torch.float64).to(dtypes[0])
    b = (a.double() + 1e-9 * torch.randn(a.shape, generator=gen, dtype=torch.float64)).to(dtypes[1])
    stats = pc._row_stats(a, b, (0, 1))
    sq, diff = a.double() ** 2, (a.double() - b.double()) ** 2
    for x in (0, 1):
        s, e = stats[x]
        dims = [d for d in range(a.dim()) if d != x]
        for got, exact in zip(s, (sq.sum(dim=dims), diff.sum(dim=dims)), strict=True):
            assert bool(((got - exact).abs() <= e * exact + 1e-300).all()), (x, dtypes)


def test_the_first_stage_proves_from_fewer_columns_and_the_later_shares_where_it_does_not(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A same-base pair is proven at the first stage alone (a prefix of the first share's columns); a pair too far
    apart for it gets the outcome the shares give without that stage, and what is proven is the only optimum."""
    gen = torch.Generator().manual_seed(5)
    n, m = 64, 2048  # stages of 64 and 128 columns: MIN_COLUMNS of the first share, FIRST_COLUMNS before it
    base = torch.randn(n, m, generator=gen)
    spec, g = _one_slot(n)
    cur = torch.arange(n)
    checks: list[int] = []
    margin = pc._margin

    def counted(*args: torch.Tensor) -> torch.Tensor:
        checks.append(len(args[2]))
        return margin(*args)

    monkeypatch.setattr(pc, "_margin", counted)
    for noise, first_alone in ((0.03, True), (0.15, False)):
        a = base + noise * torch.randn(n, m, generator=gen)
        b = base + noise * torch.randn(n, m, generator=gen)
        checks.clear()
        proven = prove_current(spec, g, {"w": a}.__getitem__, {"w": b}.__getitem__, {}, cur, CPU)
        assert (checks == [n]) == first_alone  # one check, of every row: the first stage
        monkeypatch.setattr(pc, "FIRST_COLUMNS", m)  # the first stage as large as the first share: skipped
        without = prove_current(spec, g, {"w": a}.__getitem__, {"w": b}.__getitem__, {}, cur, CPU)
        monkeypatch.undo()
        monkeypatch.setattr(pc, "_margin", counted)
        assert proven and without  # the nearer pair at the first stage, the farther one at a later share
        assert _only_optimum(_exact(a, b), cur)


@pytest.mark.parametrize("allow", [False, True])
def test_the_statistics_stand_in_for_the_finite_check_of_what_the_proof_reads(monkeypatch: pytest.MonkeyPatch,
                                                                               allow: bool) -> None:
    """A tensor pair the proof's statistics found finite is not checked again (sums of squares pass NaN and Inf
    on); a pair they did not is read through the check, which refuses it (or, allowed, zeroes it) as before."""
    from lib_rebasin.align.match_tensors import MatchTensors
    from lib_rebasin.errors import NonFiniteWeightsError
    from lib_rebasin.io import finite

    spec, g = _one_slot(16)
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(16, 40, generator=gen).half()
    b = (a.float() + 0.01 * torch.randn(16, 40, generator=gen)).half()
    checked: list[torch.Tensor] = []
    real = finite.all_finite
    monkeypatch.setattr(finite, "all_finite", lambda t: checked.append(t) or real(t))

    def proof(b: torch.Tensor) -> tuple[CurrentProof, finite.GuardedGetter]:
        ga, gb = (finite.guard_getter({"w": t}.__getitem__, finite.Model(m, m, {"w": t}.__getitem__, ["w"]), allow)
                  for m, t in (("A", a), ("B", b)))
        return CurrentProof(spec, MatchTensors(ga, CPU, False), MatchTensors(gb, CPU, False), CPU), gb

    proof_ok, guard = proof(b)
    assert proof_ok.prove(g, {}, torch.arange(16)) and not checked and guard.finite == {"w"}
    bad = b.clone()
    bad[3, 7] = float("nan")
    proof_bad, guard = proof(bad)
    if allow:
        proof_bad.prove(g, {}, torch.arange(16))
        assert checked and "w" not in guard.finite  # read through the check: the zeroed copy, never vouched for
    else:
        with pytest.raises(NonFiniteWeightsError, match="Model B"):
            proof_bad.prove(g, {}, torch.arange(16))


def test_each_window_multiplies_side_by_side_where_that_bounds_its_rounding_best() -> None:
    """Side by side, a window's rounding bound grows with all its slots' columns; one product per slot, with its
    longest slot's columns plus an accumulation per slot and stage. Each window takes the smallest bound at the last
    stage: a weight with its bias side by side at every stage (one pass over the window instead of two); three wide
    slots and two biases (a GEGLU group) side by side at the first stage only, which is one pass over the window
    instead of five and a smaller bound than slot by slot; a hundred 768-column slots (the text encoder's residual
    stream) slot by slot throughout, where side by side its bound would be over forty times larger."""
    from types import SimpleNamespace

    from lib_rebasin.align.proof_windows import joined_stages, rounding_depth

    shares = (1 / 128, 1 / 64, 1 / 16, 1 / 4, 1 / 2)

    def slots(*widths: int) -> list:
        return [SimpleNamespace(columns=lambda stage, w=w: min(w, math.ceil(w * shares[stage]))) for w in widths]

    stages = len(shares)
    assert joined_stages(slots(768, 1), stages) == stages
    geglu = slots(1280, 1280, 1280, 1, 1)
    assert joined_stages(geglu, stages) == 1
    assert rounding_depth(geglu, 0, 1) == 3 * 10 + 2 + 1  # one product of every slot's first columns
    assert rounding_depth(geglu, 4, 1) == 640 + 1 + 5 * 4 < rounding_depth(geglu, 4, 0) == 640 + 5 * 5
    residual = slots(*[768] * 106)
    assert joined_stages(residual, stages) == 0
    assert rounding_depth(residual, 4, stages) > 40 * rounding_depth(residual, 4, 0)


def test_a_window_joined_at_the_first_stage_only_holds_the_products_of_every_column_so_far(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Three wide slots and a bias on the same units, side by side at the first stage and slot by slot after it:
    at every check the proof's matrix holds, for the rows it checks, the products of exactly the columns its stages
    took so far (float64 reference, well within the rounding bound), the pair needs the later stages, and what is
    proven is the only optimum."""
    from lib_rebasin.align.proof_windows import ProofSlot

    gen = torch.Generator().manual_seed(8)
    n, m = 32, 400
    keys = ("w1", "w2", "w3")
    g = Group("g", n, "unet", "free", [Slot(k, 0, 0, 0, n) for k in (*keys, "bias")])
    spec = type("Spec", (), {"axes": {k: {0: [("g", n, 0)]} for k in (*keys, "bias")}})()
    base = {k: torch.randn(n, m, generator=gen) for k in keys} | {"bias": torch.randn(n, generator=gen)}
    a = {k: (t + 0.3 * torch.randn(t.shape, generator=gen)).half() for k, t in base.items()}
    b = {k: (t + 0.3 * torch.randn(t.shape, generator=gen)).half() for k, t in base.items()}
    cut: list[ProofSlot] = []
    real_cut, real_nearest = ProofSlot.cut, pc._nearest
    seen: list[tuple[int, float]] = []

    def cutting(self: ProofSlot, fractions: list[float]) -> None:
        real_cut(self, fractions)
        cut.append(self)

    def nearest(P: torch.Tensor, col_sq: torch.Tensor, rows: torch.Tensor, cur: torch.Tensor) -> torch.Tensor:
        stage = seen[-1][0] + 1 if seen else 0
        while stage + 1 < len(cut[0].cuts) - 1 and all(sl.cuts[stage + 2] <= sl.cuts[stage + 1] for sl in cut):
            stage += 1  # a stage whose next share adds nothing is not checked
        exact = sum((a[sl.slot.key].double().reshape(n, -1)[:, :sl.cuts[stage + 1]]
                     @ b[sl.slot.key].double().reshape(n, -1)[:, :sl.cuts[stage + 1]].T) for sl in cut)
        err = float(((P[rows].double() - exact[rows]).abs()).max() / exact.abs().max())
        seen.append((stage, err))
        return real_nearest(P, col_sq, rows, cur)

    joined: list[int] = []
    real_joined = pc.joined_stages
    monkeypatch.setattr(ProofSlot, "cut", cutting)
    monkeypatch.setattr(pc, "_nearest", nearest)
    monkeypatch.setattr(pc, "joined_stages", lambda w, stages: joined.append(real_joined(w, stages)) or joined[-1])
    cur = torch.arange(n)
    assert prove_current(spec, g, a.__getitem__, b.__getitem__, {}, cur, CPU)
    assert joined == [1]
    assert len(seen) >= 2 and seen[0][0] == 0  # the first stage left rows to a later one
    assert all(err < 1e-5 for _, err in seen), seen
    whole = {k: t.float().reshape(n, -1) for k, t in a.items()}, {k: t.float().reshape(n, -1) for k, t in b.items()}
    assert _only_optimum(_exact(torch.cat(list(whole[0].values()), 1), torch.cat(list(whole[1].values()), 1)), cur)
