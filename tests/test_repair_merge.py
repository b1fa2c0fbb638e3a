"""REPAIR as a merge option (`MergeOptions.repair`): the written checkpoint has the parents' interpolated activation
statistics at every corrected layer, a merge with nothing to repair is left alone, and the option is validated,
deterministic and cancellable like every other."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lib_rebasin.align import repair
from lib_rebasin.errors import Cancelled, RebasinError
from lib_rebasin.io.checkpoint import open_checkpoint
from lib_rebasin.merge.run import merge_checkpoints, merge_in_memory
from lib_rebasin.options import MergeOptions
from lib_rebasin.sd1.config import TINY
from lib_rebasin.sd1.spec import build_spec

REPAIR = MergeOptions(method="weighted_sum", repair=True, activation_samples=2, precision="fp32")


def _load(path: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as ck:
        return {k: ck.get(k).clone() for k in ck.keys()}


def _stats(sd: dict[str, torch.Tensor], cal: repair.Calibration) -> dict[str, repair.Stats]:
    return repair.site_stats(TINY, sd.__getitem__, cal, repair.sites(build_spec(TINY)), torch.device("cpu"))


@pytest.mark.parametrize("opts", [
    REPAIR,
    # block weights: each block's own alpha is its target's; re-basin: B's statistics after its permutation
    replace(REPAIR, method="rebasin", blocks=(0.5,) * 13 + (0.2,) * 13),
], ids=["weighted_sum", "rebasin_blocks"])
def test_written_merge_has_the_parents_interpolated_statistics(tiny_models_without_vae: dict[str, Path],
                                                              tmp_path: Path, opts: MergeOptions) -> None:
    """Run A, aligned B and the *written file* on the calibration inputs: at every corrected layer the file's
    per-channel mean and std are the interpolation of the parents' (without REPAIR they have collapsed). REPAIR
    corrects UNet layers: the inputs are the tiny models without their VAE, and the file is half the bytes."""
    models = tiny_models_without_vae
    res = merge_checkpoints(models["a"], models["independent"], tmp_path / "o.safetensors", opts)
    plain, _ = merge_in_memory(models["a"], models["independent"], replace(opts, repair=False))
    spec = build_spec(TINY)
    a = _load(models["a"])
    b_aligned = _aligned_b(models, opts, _load(models["independent"]))
    cal = repair.calibration(TINY, a.__getitem__, opts.activation_samples, opts.seed, torch.device("cpu"))
    sa, sb = _stats(a, cal), _stats(b_aligned, cal)
    plain_keys = plain.keys()
    got, before = _stats(_load(res.output), cal), _stats({k: plain.get(k) for k in plain_keys}, cal)
    names = repair.sites(spec)
    assert len(names) == res.diagnostics.repaired_layers == 124  # SD 1.x's residual writers (repair.SITE)
    collapsed = []
    for name in names:
        al = opts.alpha_of(f"{name}.weight")
        want_mu = (1 - al) * sa[name].mean + al * sb[name].mean
        want_sd = (1 - al) * sa[name].std + al * sb[name].std
        torch.testing.assert_close(got[name].std, want_sd, rtol=2e-3, atol=2e-4, msg=name)
        torch.testing.assert_close(got[name].mean, want_mu, rtol=2e-3, atol=2e-4, msg=name)
        collapsed.append(float((before[name].std / want_sd).median()))
    assert sorted(collapsed)[len(collapsed) // 2] < 0.9, "the plain blend was expected to shrink activations"
    d = res.diagnostics
    assert d.repair_samples == opts.activation_samples and d.repair_scale[1] > 1
    assert any(line.startswith("REPAIR: ") for line in d.summary_lines())


def _aligned_b(models: dict[str, Path], opts: MergeOptions, b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """B as the merge aligned it: re-basin at alpha 1 is pi(B) itself (the matching does not depend on alpha)."""
    if not opts.aligned:
        return b
    ck, _ = merge_in_memory(models["a"], models["independent"], replace(opts, repair=False, blocks=None, alpha=1.0))
    return {k: ck.get(k).clone() for k in ck.keys()}


def test_nothing_to_repair_leaves_the_merge_alone(models: dict[str, Path], tmp_path: Path) -> None:
    """B is a planted permutation of A's fine-tune: re-basin undoes it, the merge at alpha 1 *is* that fine-tune,
    its statistics are already the target and REPAIR changes no weight: scales exactly 1, shifts exactly 0. The
    merge is held in memory: its tensors are those the file would hold."""
    from model_cache import cached_checkpoint

    plain = cached_checkpoint(tmp_path / "plain.safetensors", "mini", seed=11, base_seed=1, precision="fp32")
    merged, d = merge_in_memory(plain, models["shuffled"], replace(REPAIR, method="rebasin", alpha=1.0, tolerance=0.0))
    ref = _load(plain)
    wrong = [k for k in ref if not torch.equal(merged.get(k), ref[k])]
    assert not wrong, wrong[:5]
    assert d.repaired_layers == 124 and d.repair_scale == [1.0, 1.0, 1.0]


def test_same_options_same_bytes(tiny_models: dict[str, Path]) -> None:
    from same_bytes import same_bytes

    opts = replace(REPAIR, parts=("unet", "te"), precision="fp16")
    one, _ = merge_in_memory(tiny_models["a"], tiny_models["independent"], opts)
    two, _ = merge_in_memory(tiny_models["a"], tiny_models["independent"], opts)
    assert same_bytes(one, two)


@pytest.mark.parametrize("change, words", [
    (dict(repair=1), "repair must be true or false"),
    (dict(method="add_difference"), "REPAIR restores the statistics of an interpolation of two models"),
    (dict(method="legacy"), "REPAIR restores the statistics"),
    (dict(parts=("te", "vae")), "parts must include unet"),
])
def test_bad_options_are_refused_in_one_line(change: dict, words: str) -> None:
    with pytest.raises(RebasinError, match=words) as e:
        replace(REPAIR, **change).validate()
    assert "\n" not in str(e.value)


def test_inpainting_model_is_refused_before_any_work(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    from model_cache import cached_checkpoint

    inpaint = cached_checkpoint(tmp_path / "inpaint.safetensors", replace(TINY, unet_in_channels=9), seed=3,
                                precision="fp32")
    with pytest.raises(RebasinError, match="REPAIR runs plain SD 1.x UNets; model A is SD 1.x inpainting"):
        merge_checkpoints(inpaint, tiny_models["a"], tmp_path / "o.safetensors", REPAIR)
    assert not (tmp_path / "o.safetensors").exists()


def test_cancel_during_repair_leaves_no_file(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    seen: list[str] = []

    def cancel() -> bool:  # inside a statistics pass, not between two: a full-size pass takes minutes
        return any(m.startswith("REPAIR: statistics of model B (3/") for m in seen)

    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(Cancelled):
        merge_checkpoints(tiny_models["a"], tiny_models["independent"], out / "o.safetensors", REPAIR,
                          progress=lambda e: seen.append(e.message), cancel=cancel)
    assert list(out.iterdir()) == []
    assert not any(m.startswith("REPAIR: statistics of model B (4/") for m in seen)
