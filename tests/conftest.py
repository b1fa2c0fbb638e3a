"""Shared fixtures: small synthetic SD-1.5-layout checkpoints, made once and cached across runs (model_cache.py)."""

from __future__ import annotations

import sys
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
