"""The SDXL spec drives the existing weight matching unchanged: a model whose every group was permuted at random
(legally) is matched back onto the original exactly, over both text encoders (OpenCLIP's fused in_proj included),
the UNet and the VAE."""

from __future__ import annotations

import torch

from lib_rebasin.align.permute import inverse, permute_tensor, random_perms
from lib_rebasin.align.weight_matching import weight_matching
from lib_rebasin.sdxl.config import MINI
from lib_rebasin.sdxl.spec import build_spec
from lib_rebasin.sdxl.synthetic import synthetic_tensor


def test_planted_permutations_of_every_group_are_recovered() -> None:
    spec = build_spec(MINI)
    a = {k: synthetic_tensor(k, s, 0) for k, s in spec.shapes.items()}
    planted = random_perms(spec.groups.values(), seed=21)
    b = {k: permute_tensor(spec, k, v, planted) for k, v in a.items()}
    res = weight_matching(spec, spec.groups_in(["unet", "te", "vae"]), a.__getitem__, b.__getitem__, max_sweeps=5)
    assert res.converged
    wrong = [n for n, p in planted.items() if not torch.equal(res.perms[n], inverse(p))]
    assert not wrong, f"{len(wrong)} groups not recovered, e.g. {wrong[:3]}"
    aligned = {k: permute_tensor(spec, k, v, res.perms) for k, v in b.items()}
    assert all(torch.equal(aligned[k], a[k]) for k in a)
