"""The quality benchmark's REPAIR lever on two real (diffusers-initialised, untrained) width-32 SD-layout UNets:
after the correction every corrected layer's per-channel std is the interpolation of the parents', the
correction lives in the weights (an ordinary checkpoint), and the merge it was given is left untouched."""

from __future__ import annotations

import pytest
import torch

from benchmarks.quality import repair_lever as repair
from benchmarks.quality.evaluate import Model
from benchmarks.quality.layout import new_unet, sd_config, te_ldm, unet_to_ldm

WIDTH = 32


def _ldm(seed: int) -> dict[str, torch.Tensor]:
    c = sd_config(WIDTH)
    return {**unet_to_ldm(c, new_unet(c, seed).state_dict()), **te_ldm(c)}


@pytest.fixture(scope="module")
def parents():
    a, b = _ldm(1), _ldm(2)
    merged = {k: 0.5 * a[k] + 0.5 * b[k] for k in a}
    cal = repair.calibration(4)
    names = repair.site_names(Model(WIDTH, a).unet, "all")
    return a, b, merged, cal, names, repair.site_stats(WIDTH, a, names, cal), repair.site_stats(WIDTH, b, names, cal)


@pytest.mark.parametrize("where", ["residual", "output"])
def test_repair_restores_interpolated_std_in_the_weights(parents, where: str) -> None:
    a, _, merged, cal, _, sa, sb = parents
    before = {k: v.clone() for k, v in merged.items()}
    fixed, collapse = repair.corrected(WIDTH, sa, sb, merged, 0.5, where, cal)

    assert all(torch.equal(merged[k], before[k]) for k in merged), "the merge it was given was modified"
    sites = repair.site_names(Model(WIDTH, a).unet, where)
    assert set(collapse) == set(sites)
    # The weights alone (no hooks) now give each corrected site the parents' interpolated statistics.
    after = repair.site_stats(WIDTH, fixed, sites, cal)
    for n in sites:
        target_std = 0.5 * sa[n].std + 0.5 * sb[n].std
        target_mean = 0.5 * sa[n].mean + 0.5 * sb[n].mean
        torch.testing.assert_close(after[n].std, target_std, rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(after[n].mean, target_mean, rtol=1e-3, atol=1e-4)
    # Only the corrected layers' weights and biases changed.
    changed = {k for k in merged if not torch.equal(fixed[k], merged[k])}
    assert changed and all(k.startswith("model.diffusion_model.") for k in changed)
    assert len(changed) <= 2 * len(sites)
