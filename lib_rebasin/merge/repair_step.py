"""REPAIR as a step of a merge: its per-channel corrections measured on the models as they will be written, and
folded into the merged tensors as they are produced (the statistics and the folding are `align/repair.py`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..align.permute import Perms, permute_tensor
from ..align.repair import corrections, fold_bias, fold_weight
from ..archspec import ArchSpec
from ..device_budget import budget_for, forward_need
from ..io.model_input import ModelInput
from ..options import MergeOptions
from ..progress import Reporter
from ..sd1.activation_inputs import LATENT_SIZE
from .diagnostics import Diagnostics

# {layer (a key without ".weight"/".bias"): (scale, shift)} per output channel.
Corrections = dict[str, tuple[torch.Tensor, torch.Tensor]]


def repair_corrections(spec: ArchSpec[Any], A: ModelInput, B: ModelInput, opts: MergeOptions,
                       blend: Callable[[str], torch.Tensor], merged_keys: set[str], perms: Perms,
                       device: torch.device, report: Reporter, diag: Diagnostics) -> Corrections:
    """REPAIR's per-channel corrections of the merge, measured on the models as they will be written: A, B with
    the merge's permutations (the same function as B), and the merge (blended keys, A's elsewhere)."""
    def get_b_aligned(key: str) -> torch.Tensor:
        return permute_tensor(spec, key, B.ckpt.get(key), perms)

    def get_merge(key: str) -> torch.Tensor:
        return blend(key) if key in merged_keys else A.ckpt.get(key)

    out = budget_for(device, report).run(
        "REPAIR", forward_need(spec, LATENT_SIZE),
        lambda dev: corrections(spec, A.ckpt.get, get_b_aligned, get_merge, opts.alpha_of,
                                samples=opts.activation_samples, seed=opts.seed, device=dev,
                                progress=lambda f, m: report("repair", f, m)))
    scales = torch.cat([s for s, _ in out.values()])
    diag.repaired_layers = len(out)
    diag.repair_samples = opts.activation_samples
    diag.repair_scale = [float(f"{float(q):.3g}") for q in scales.quantile(torch.tensor([0.1, 0.5, 0.9],
                                                                                        dtype=scales.dtype))]
    return out


def has_correction(repaired: Corrections, key: str) -> bool:
    """Whether `corrected` changes `key`'s merged value."""
    return key.rpartition(".")[0] in repaired


def corrected(repaired: Corrections, key: str, t: torch.Tensor) -> torch.Tensor:
    """`t`, the merged value of `key`, with its layer's correction folded in (in fp64), if it has one."""
    layer, _, kind = key.rpartition(".")
    if layer not in repaired:
        return t
    scale, shift = repaired[layer]
    return fold_weight(t, scale) if kind == "weight" else fold_bias(t, scale, shift)
