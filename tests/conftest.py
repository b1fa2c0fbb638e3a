"""Shared fixtures: small synthetic SD-1.5-layout checkpoints, made once and cached across runs (model_cache.py)."""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests import helpers such as reference.py directly

# Two cores: one intra-op thread avoids oversubscription when CI runs other work alongside.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """fp32 mini checkpoints: A, a same-base fine-tune of A's base, an independent model, a shuffled fine-tune.

    Hard links into the on-disk model cache (`model_cache.py`): read them, never write into them; a test that
    damages its inputs takes its own copies (`model_cache.place(..., writable=True)`)."""
    from model_cache import cached_checkpoint, cached_shuffled_finetune

    d = tmp_path_factory.mktemp("models")
    out = {
        "a": cached_checkpoint(d / "a.safetensors", "mini", seed=11, base_seed=1, precision="fp32"),
        "finetune": cached_checkpoint(d / "finetune.safetensors", "mini", seed=12, base_seed=1, precision="fp32"),
        "independent": cached_checkpoint(d / "independent.safetensors", "mini", seed=2, precision="fp32"),
        "shuffled": cached_shuffled_finetune(d / "shuffled.safetensors", base_seed=1, seed=11, perm_seed=5,
                                             precision="fp32"),
    }
    return out


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same four models at the tiny scale (SD 1.5's keys, small shapes): for tests of files, the UI, the API
    and recipes, where the spec is not what is tested. A module uses them in place of `models` by overriding that
    fixture with `tiny_models`. Hard links into the model cache, like `models`."""
    from model_cache import cached_checkpoint, cached_shuffled_finetune

    d = tmp_path_factory.mktemp("tiny_models")
    return {
        "a": cached_checkpoint(d / "a.safetensors", "tiny", seed=11, base_seed=1, precision="fp32"),
        "finetune": cached_checkpoint(d / "finetune.safetensors", "tiny", seed=12, base_seed=1, precision="fp32"),
        "independent": cached_checkpoint(d / "independent.safetensors", "tiny", seed=2, precision="fp32"),
        "shuffled": cached_shuffled_finetune(d / "shuffled.safetensors", base_seed=1, seed=11, perm_seed=5,
                                             precision="fp32", config="tiny"),
    }


@pytest.fixture(scope="session")
def tiny_models_without_vae(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
                            ) -> dict[str, Path]:
    """Three of `tiny_models` (a, finetune, independent) without their VAE (a UNet and a text encoder: SD 1.x
    checkpoints still, merged as one), for tests of what happens to a merge's output (its commit, a sweep's
    candidates, a replay) where the VAE is not what is tested: every output, partial file and reference is then
    half the bytes. From the model cache (`cached_without_parts`), hard links like `tiny_models`."""
    from model_cache import cached_without_parts

    d = tmp_path_factory.mktemp("tiny_models_without_vae")
    return {name: cached_without_parts(d / f"{name}.safetensors", tiny_models[name], ("vae",))
            for name in ("a", "finetune", "independent")}


# What each test module costs (opt-in, for docs/testing.md): LIB_REBASIN_TEST_COST=FILE appends one JSON line per
# module and worker with the bytes its tests wrote (/proc/self/io write_bytes, reaped subprocesses included) and
# their CPU time. Setup and teardown count with the test they belong to, so a module's fixtures count with it.
_COST_FILE = os.environ.get("LIB_REBASIN_TEST_COST")


def _io_written() -> int:
    try:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("write_bytes:"))
    except (OSError, StopIteration):
        return 0


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


_module_cost: dict[str, list[float]] = {}
_test_written: dict[str, int] = {}


if _COST_FILE:

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):  # type: ignore[no-untyped-def]
        written, cpu, wall = _io_written(), _cpu_seconds(), time.monotonic()
        yield
        cost = _module_cost.setdefault(item.nodeid.split("::")[0], [0.0, 0.0, 0.0, 0])
        _test_written[item.nodeid] = _io_written() - written
        cost[0] += _test_written[item.nodeid]
        cost[1] += _cpu_seconds() - cpu
        cost[2] += time.monotonic() - wall
        cost[3] += 1

    def pytest_sessionfinish(session: pytest.Session) -> None:
        with open(_COST_FILE, "a") as f:
            for module, (written, cpu, wall, tests) in _module_cost.items():
                mine = sorted((n for n in _test_written if n.split("::")[0] == module), key=_test_written.__getitem__)
                f.write(json.dumps({"module": module, "written": int(written), "cpu_s": round(cpu, 2),
                                    "wall_s": round(wall, 2), "tests": tests,
                                    "most_written": {n.split("::", 1)[1]: _test_written[n] for n in mine[-3:]}})
                        + "\n")
