"""Shared fixtures: small synthetic SD-1.5-layout checkpoints, generated once per test session."""

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
    """fp32 mini checkpoints: A, a same-base fine-tune of A's base, an independent model, a shuffled fine-tune."""
    from lib_rebasin.demo import make_shuffled_finetune
    from lib_rebasin.sd1.synthetic import make_checkpoint

    d = tmp_path_factory.mktemp("models")
    out = {
        "a": make_checkpoint(d / "a.safetensors", "mini", seed=11, base_seed=1, precision="fp32"),
        "finetune": make_checkpoint(d / "finetune.safetensors", "mini", seed=12, base_seed=1, precision="fp32"),
        "independent": make_checkpoint(d / "independent.safetensors", "mini", seed=2, precision="fp32"),
        "shuffled": make_shuffled_finetune(d / "shuffled.safetensors", base_seed=1, seed=11, perm_seed=5,
                                           precision="fp32"),
    }
    return out
