"""A merge's heavy loops run under our own torch settings, not the host's: one CPU left free (OpenMP's spinning
barriers make a full team many times slower on a busy machine), no autograd, and the host's thread count back
afterwards."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lib_rebasin.compute import merge_threads, usable_cpus
from lib_rebasin.options import MergeOptions
from lib_rebasin.merge.run import merge_checkpoints
from lib_rebasin.progress import ProgressEvent


@pytest.fixture(scope="module")
def models(tiny_models: dict[str, Path]) -> dict[str, Path]:
    """Tiny models in place of the mini ones: what is tested is thread counts, not the spec."""
    return tiny_models


@pytest.mark.skipif(usable_cpus() < 2, reason="with one CPU the host's single thread is already ours")
def test_a_merge_runs_with_a_cpu_left_free_and_restores_the_hosts_threads(models: dict[str, Path],
                                                                           tmp_path: Path) -> None:
    host = torch.get_num_threads()
    seen: list[tuple[int, bool]] = []

    def progress(ev: ProgressEvent) -> None:
        seen.append((torch.get_num_threads(), torch.is_grad_enabled()))

    opts = MergeOptions(matching="activations", activation_samples=1, parts=("te",), repair=False)
    try:
        torch.set_num_threads(usable_cpus())  # what a WebUI runs with: torch's default, every CPU
        merge_checkpoints(models["a"], models["independent"], tmp_path / "o.safetensors", opts, progress=progress)
        assert torch.get_num_threads() == usable_cpus()  # the host's setting is back
        assert set(seen) == {(usable_cpus() - 1, False)}
        # a host that asked for fewer threads keeps its limit
        torch.set_num_threads(1)
        seen.clear()
        merge_checkpoints(models["a"], models["independent"], tmp_path / "o.safetensors",
                          replace(opts, method="weighted_sum", matching="weights"), overwrite=True, progress=progress)
        assert set(seen) == {(1, False)} and merge_threads() == 1
    finally:
        torch.set_num_threads(host)
