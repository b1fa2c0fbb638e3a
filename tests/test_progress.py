"""One progress bar per job: nested steps (re-basin's iterations, activation matching's VAE part, a recipe's steps)
each fill their own share, the fraction never goes back, every message names the step it is in, and the ETA is
the whole job's."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from lib_rebasin.options import MergeOptions
from lib_rebasin.merge.run import merge_checkpoints
from lib_rebasin.progress import ProgressEvent, Reporter


@pytest.fixture(scope="module")
def models(tiny_models: dict[str, Path]) -> dict[str, Path]:
    """Tiny models in place of the mini ones: what is tested is progress reporting, not the spec."""
    return tiny_models


def test_nested_parts_fill_their_share_and_never_go_back() -> None:
    now = [0.0]
    seen: list[ProgressEvent] = []
    r = Reporter(seen.append, None, clock=lambda: now[0])
    r.stage(0.0, 0.5)
    for x in range(2):
        with r.part(x / 2, (x + 1) / 2, f"step {x + 1}/2"):
            for local in (0.0, 0.5, 1.0):
                now[0] += 1.0
                r("matching", local, "sweep")
    r("matching", 0.0, "a late report from the start of the stage")
    r.stage(0.5, 1.0)
    now[0] += 6.0
    r("writing", 1.0, "done")
    assert [round(e.fraction, 3) for e in seen] == [0.0, 0.125, 0.25, 0.25, 0.375, 0.5, 0.5, 1.0]
    assert [e.message for e in seen[:6]] == ["step 1/2: sweep"] * 3 + ["step 2/2: sweep"] * 3
    assert seen[6].message == "a late report from the start of the stage"  # outside the parts: no step named
    # the whole job's ETA: 4 s for the first half, so 4 s left at 0.5 (not the stage's own, restarting estimate)
    assert seen[5].eta_s == pytest.approx(6.0) and seen[0].eta_s is None and seen[-1].eta_s == 0.0


def test_relay_maps_a_sub_jobs_whole_bar_into_its_share() -> None:
    seen: list[ProgressEvent] = []
    chain = Reporter(seen.append, None)
    for i in range(2):
        step = Reporter(chain.relay(i / 2, (i + 1) / 2, f"step {i + 1}/2 (s{i})"), None)
        with step.part(0.0, 1.0, "step 1/1"):
            step("matching", 0.5, "m")
        step("writing", 1.0, "w")
    assert [(e.fraction, e.message) for e in seen] == [
        (0.25, "step 1/2 (s0): step 1/1: m"), (0.5, "step 1/2 (s0): w"),
        (0.75, "step 2/2 (s1): step 1/1: m"), (1.0, "step 2/2 (s1): w")]


ACT = MergeOptions(matching="activations", activation_samples=1)  # fp16 output: the bar, not the bytes, is tested


@pytest.mark.parametrize("options", [
    MergeOptions(iterations=3),
    replace(ACT, iterations=3, parts=("te", "vae")),
    replace(ACT, iterations=2, repair=True),
], ids=["weights", "activations", "activations+repair"])
def test_iterations_show_one_bar_naming_each_step(models: dict[str, Path], tmp_path: Path,
                                                   options: MergeOptions) -> None:
    seen: list[ProgressEvent] = []
    merge_checkpoints(models["a"], models["independent"], tmp_path / "o.safetensors", options, progress=seen.append)
    fractions = [e.fraction for e in seen]
    assert all(b >= a for a, b in zip(fractions, fractions[1:])), "the bar went back"
    assert fractions[-1] == 1.0
    n = options.iterations
    matching = [e for e in seen if e.stage == "matching"]
    steps = [int(m.group(1)) if (m := re.match(rf"step (\d)/{n}: ", e.message)) else None for e in matching]
    assert None not in steps, [e.message for e, k in zip(matching, steps) if k is None][:3]
    assert steps == sorted(steps) and steps[0] == 1
    if options.matching == "activations":  # activations are not linear in the weights: every step runs
        assert set(steps) == set(range(1, n + 1))
    # The matching stage's share of the bar, from its first report to the first report of the next stage; step k
    # fills the k-th n-th of it, and moves the bar inside it.
    start = matching[0].fraction
    end = seen[seen.index(matching[-1]) + 1].fraction
    share = (end - start) / n
    for k in set(steps):
        own = [e.fraction for e, s in zip(matching, steps) if s == k]
        lo, hi = start + (k - 1) * share, start + k * share
        assert lo - 1e-9 <= min(own) and max(own) <= hi + 1e-9, (k, min(own), max(own), lo, hi)
        assert max(own) - min(own) > share / 3, (k, min(own), max(own))
    if options.repair:
        assert any(e.stage == "repair" for e in seen)
