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
def test_a_recipe_run_twice_returns_to_its_starting_memory(tmp_path, tmp_path_factory):
    from model_cache import cached_checkpoint, cached_without_parts

    # Mini fp16 models without their VAE (the probe merges the UNet and the text encoder): each run's intermediate
    # model is still the inputs' size, and the output each run writes is 62 % of a model with its VAE.
    full = tmp_path_factory.mktemp("with_vae")
    for i, name in enumerate(("one", "two", "three"), 1):
        cached_without_parts(tmp_path / f"{name}.safetensors",
                             cached_checkpoint(full / f"{name}.safetensors", "mini", seed=i, base_seed=1))
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




# Run in a fresh process: a free block left in this process's heap by an earlier test would serve the requests below
# from the heap whatever the thresholds.
_HEAP_PROBE = """
import json, os, sys
from pathlib import Path
import torch
from lib_rebasin import memory

def rss():
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

if memory._malloc_trim() is None or memory._user_tuned():
    print(json.dumps(None))
    sys.exit()
size = 256 << 20
out = {}

def freed(name, trim=False, size=size):
    block = torch.ones(size // 4)  # every page touched
    after = torch.ones(1 << 16)  # allocated after it: keeps the heap's top above it if it is in the heap
    before = rss()
    del block
    out[name] = before - rss()
    if trim:
        assert memory.trim_free_pages()
        out[name + " then trimmed"] = before - rss()
    assert after.sum() == 1 << 16

with memory.reused_heap():
    with memory.own_mappings():
        with memory.own_mappings():
            freed("own mapping")
        freed("own mapping, nested")
        with memory.heap_blocks():
            freed("heap block")
        # larger than the heap block's freed pages (which would serve it whatever the thresholds)
        freed("own mapping after a heap block", size=2 * size)
    freed("reused", trim=True)
    if memory._resident_idle_bytes() is not None:  # glibc 2.33 and later
        check = memory.idle_heap_trimmer(limit=size // 2)
        for name, n in (("idle growth below the limit", size // 4), ("idle growth above the limit", size)):
            block = torch.ones(n // 4)
            after = torch.ones(1 << 16)
            before = rss()
            del block
            check()
            out[name] = before - rss()
            assert after.sum() == 1 << 16
    out["depth"] = memory._depth
    out["own depth"] = memory._own_depth
print(json.dumps(out))
"""


def _heap_probe() -> dict[str, int]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", _HEAP_PROBE], env=env, check=False, cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    if out is None:
        pytest.skip("not glibc, or the process's own malloc settings (the heap is not reused)")
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc, /proc/self/statm")
def test_freed_heap_pages_are_given_back_by_trimming_or_at_once_from_an_own_mapping() -> None:
    """Inside a merge's reused heap a freed block stays resident while anything allocated after it is alive, until
    `trim_free_pages` gives its pages back (activation matching's step between batches); a block allocated inside
    `own_mappings()` (activation matching's forward passes) is mapped on its own and goes back at once, also in a
    nested block and after a `heap_blocks()` block (the layers' weights), whose own blocks are kept in the heap;
    after the outermost block the merge's thresholds are back (the next block is reused, not given back)."""
    size = 256 << 20
    out = _heap_probe()
    assert out["own mapping"] > size * 3 / 4 and out["own mapping, nested"] > size * 3 / 4, out
    assert out["heap block"] < size / 4 and out["own mapping after a heap block"] > size * 3 / 2, out
    assert out["reused"] < size / 4 and out["reused then trimmed"] > size * 3 / 4, out
    assert out["depth"] == 1 and out["own depth"] == 0, out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc, /proc/self/status")
def test_a_heap_grown_by_its_free_blocks_is_trimmed_between_visits() -> None:
    """Weight matching's check after each visit (`idle_heap_trimmer`): freed blocks stay resident for reuse while
    the resident memory not in use has grown by less than its limit since the check was made, and are given back
    once it grew by more (a run whose holes no longer fit its next buffers)."""
    size = 256 << 20
    out = _heap_probe()
    if "idle growth below the limit" not in out:
        pytest.skip("glibc before 2.33: no mallinfo2, nothing is checked")
    assert out["idle growth below the limit"] < size / 16, out
    assert out["idle growth above the limit"] > size * 3 / 4, out
