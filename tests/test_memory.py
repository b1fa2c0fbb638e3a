"""Memory after a job: a recipe run through the tab's service, twice in one fresh process, leaves no live tensor
behind and gives the memory of its intermediate models back (the host returns near its size before the run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_a_recipe_run_twice_returns_to_its_starting_memory(tmp_path):
    from model_cache import cached_checkpoint

    for i, name in enumerate(("one", "two", "three"), 1):
        cached_checkpoint(tmp_path / f"{name}.safetensors", "mini", seed=i, base_seed=1)
    size = (tmp_path / "one.safetensors").stat().st_size
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "memory_probe.py"), str(tmp_path)], env=env, check=False,
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    start_tensors, *after_tensors = report["tensors"]
    assert after_tensors == [start_tensors] * 2  # no tensor outlives its job
    start, *after = report["rss"]
    # Each run holds an intermediate model (the inputs' size) next to its working buffers; what stays afterwards
    # must be far less than that (libraries initialised on first use, allocator bookkeeping).
    assert max(after) - start < size / 2, [f"{(r - start) / 1e6:+.0f} MB" for r in after]
    assert not list(tmp_path.glob("probe*"))
