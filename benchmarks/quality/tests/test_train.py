"""The quality benchmark's training resumes where a shorter run of the same configuration stopped: training to 2
steps, then to 4, gives bit for bit the model (and loss record) of one 4-step run, and only the last milestone
keeps the optimizer state."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from benchmarks.quality import export as export_module
from benchmarks.quality import layout
from benchmarks.quality import train as train_module
from benchmarks.quality.export import single_file
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


def test_the_single_file_export_is_the_trained_model_plus_the_shared_vae_written_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The benchmark's full profiles merge these exports (the smoke run merges the trained files): every trained
    tensor unchanged, the shared VAE added, written the first time it is asked for and atomically."""
    torch.set_num_threads(1)
    for module in (train_module, export_module):
        monkeypatch.setattr(module, "sd_config", lambda width: replace(layout.sd_config(width), gn_groups=WIDTH))
    t = train(tmp_path, TrainConfig(WIDTH, init_seed=1, data_seed=101, steps=2, batch=2), log=_quiet,
              resumable=False)[2]
    assert single_file(t, export=False) == t.path
    out = single_file(t)
    trained, exported = load_file(str(t.path)), load_file(str(out))
    vae = {k for k in exported if k.startswith("first_stage_model.")}
    assert vae and set(exported) == set(trained) | vae
    assert all(torch.equal(exported[k], v) for k, v in trained.items())
    assert all(torch.equal(exported[k], v) for k, v in layout.vae_ldm(export_module.sd_config(WIDTH)).items())
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["benchmark"] == "quality"
    stamp = out.stat().st_mtime_ns
    assert single_file(t) == out and out.stat().st_mtime_ns == stamp
    assert not list(out.parent.glob("*.tmp"))
