"""The merge-quality benchmark's quick mode, run as a user runs it (in its smoke profile: the same sections and
checks with fewer training and sampling steps): it trains tiny SD-1.x-layout diffusion models, merges them
through the real merge API and checks the controls (a planted permutation is undone exactly, with zero barrier;
fine-tunes of one base give a re-basin merge bit-identical to the weighted sum)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]  # the repository: `python -m benchmarks.quality` runs from there


def test_quick_benchmark_controls(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.quality", "--profile", "smoke", "--data",
                           str(tmp_path / "data"), "--out", str(tmp_path / "out")], check=False, cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    results = json.loads((tmp_path / "out" / "results.json").read_text())
    planted = results["controls"]["planted_permutation"]
    assert planted["units_permuted"] > 0
    assert planted["loss_b"] == pytest.approx(planted["loss_a"], rel=1e-5)
    assert planted["rebasin_barrier"] == 0.0
    assert planted["rebasin_merge_max_abs_diff_from_a"] == 0.0
    assert planted["activation_matching_max_abs_diff_from_a"] == 0.0
    assert planted["weighted_sum_barrier"] > 0.01
    same = results["controls"]["same_base_identity"]
    assert same["bit_identical"] and same["units_moved"] == 0

    # Both families were merged with both methods at every alpha of the profile, and the report was written.
    for fam in ("independent", "same_base"):
        methods = results["families"][fam]["methods"]
        assert set(methods) == {"weighted sum", "re-basin"}
        assert list(methods["re-basin"]["curve"]) == ["0.0", "0.5", "1.0"]
        assert len(methods["re-basin"]["skills"]) == 10
    report = (tmp_path / "out" / "results.md").read_text()
    assert "bit-identical to the weighted sum" in report
    for png in ("barrier_independent.png", "skills_same_base.png"):
        assert (tmp_path / "out" / png).stat().st_size > 1000
    # Trained models are cached: nothing is left half-written.
    assert not list((tmp_path / "data").rglob("*.tmp"))

    # Each method's result is cached on its own: with the section's file gone (as when another method's
    # revision changes its key), a rerun measures the parents again but reuses both methods' results unchanged.
    for f in (tmp_path / "data" / "sections").glob("independent-*.json"):
        f.unlink()
    again = subprocess.run([sys.executable, "-m", "benchmarks.quality", "--profile", "smoke", "--data",
                            str(tmp_path / "data"), "--out", str(tmp_path / "again"), "--sections", "independent",
                            "--no-train"],
                           check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("reusing its result") == 2, again.stdout[-3000:]
    rerun = json.loads((tmp_path / "again" / "results.json").read_text())
    assert rerun["families"]["independent"]["methods"] == results["families"]["independent"]["methods"]
