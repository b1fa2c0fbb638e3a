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



def _rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim, /proc/self/statm")
def test_free_heap_pages_below_live_memory_are_given_back_inside_a_reused_heap() -> None:
    """Inside a merge's reused heap a freed block stays resident while anything allocated after it is alive (the
    heap cannot shrink past it); `trim_free_pages` (activation matching's step between batches) gives its pages
    back, and leaves the merge's thresholds in place."""
    import torch

    from lib_rebasin import memory

    if memory._malloc_trim() is None or memory._user_tuned():
        pytest.skip("not glibc, or the process's own malloc settings (the heap is not reused)")
    size = 256 << 20
    with memory.reused_heap():
        hole = torch.ones(size // 4)  # from the heap (under the merge's mmap threshold), every page touched
        after = torch.ones(1 << 16)  # allocated after it: keeps the heap's top above the hole
        before = _rss()
        del hole
        kept = _rss()
        assert memory.trim_free_pages()
        trimmed = _rss()
        assert memory._depth == 1 and after.sum() == 1 << 16
    assert before - kept < size / 4  # freed, but still resident
    assert kept - trimmed > size * 3 / 4, (before, kept, trimmed)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's thresholds, /proc/self/statm")
def test_a_returned_heap_inside_a_reused_one_gives_freed_blocks_back_at_once() -> None:
    """Activation matching's forward passes run in `returned_heap()` inside the merge's `reused_heap()`: a large
    block freed there goes back to the system at once, and after it the merge's thresholds are back (a block freed
    then stays resident for reuse)."""
    import torch

    from lib_rebasin import memory

    if memory._malloc_trim() is None or memory._user_tuned():
        pytest.skip("not glibc, or the process's own malloc settings (the heap is not reused)")
    size = 256 << 20

    def given_back() -> int:
        block = torch.ones(size // 4)
        after = torch.ones(1 << 16)  # allocated after it: keeps the heap's top above it if it is in the heap
        before = _rss()
        del block
        assert after.sum() == 1 << 16
        return before - _rss()

    with memory.reused_heap():
        with memory.returned_heap():
            returned = given_back()
        reused = given_back()
    assert returned > size * 3 / 4 and reused < size / 4, (returned, reused)
    memory.trim_free_pages()
