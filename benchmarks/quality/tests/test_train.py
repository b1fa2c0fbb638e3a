"""The quality benchmark's training resumes where a shorter run of the same configuration stopped: training to 2
steps, then to 4, gives bit for bit the model (and loss record) of one 4-step run, and only the last milestone
keeps the optimizer state."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from benchmarks.quality import layout
from benchmarks.quality import train as train_module
from benchmarks.quality.train import TrainConfig, load_ldm, train

# Resuming is the same code at any width: a width-8 UNet (8 GroupNorm groups of one channel; the benchmark's models
# are width 32 and up, GroupNorm 32) writes a fourteenth of the bytes of width 32's for its milestones and its
# optimizer state.
WIDTH = 8


def _quiet(_: str) -> None:
    pass


def test_training_longer_resumes_the_shorter_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.set_num_threads(1)
    monkeypatch.setattr(train_module, "sd_config", lambda width: replace(layout.sd_config(width), gn_groups=WIDTH))
    cfg = TrainConfig(WIDTH, init_seed=1, data_seed=101, steps=4, batch=2)
    # The reference run is never trained on: it keeps no state to resume from (the optimizer's, twice the model).
    straight = train(tmp_path / "straight", cfg, milestones=(2,), log=_quiet, resumable=False)
    assert not list((tmp_path / "straight" / "models").glob("*.resume.pt"))

    logged: list[str] = []
    first = train(tmp_path / "resumed", TrainConfig(WIDTH, init_seed=1, data_seed=101, steps=2, batch=2), log=_quiet)
    assert (tmp_path / "resumed" / "models" / f"{first[2].config.key()}.resume.pt").exists()
    resumed = train(tmp_path / "resumed", cfg, milestones=(2,), log=logged.append)
    assert any("resuming after step 2" in line for line in logged)
    assert resumed[2].path == first[2].path      # the shorter run's state is reused, not retrained

    for steps in (2, 4):
        a, b = load_ldm(straight[steps]), load_ldm(resumed[steps])
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), steps
    assert resumed[4].record["loss_curve"] == straight[4].record["loss_curve"]
    assert resumed[4].record["distance"] == straight[4].record["distance"]
    assert resumed[4].record["resumed_after"] == 2
    # Only the run's last milestone keeps what training on needs; nothing half-written is left.
    models = tmp_path / "resumed" / "models"
    assert [p.name for p in models.glob("*.resume.pt")] == [f"{resumed[4].config.key()}.resume.pt"]
    assert not list(models.glob("*.tmp"))
