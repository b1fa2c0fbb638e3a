"""The two controls every run checks (and `--quick` asserts):

- planted permutation: B is A with a random legal permutation of every UNet and text-encoder group. B computes
  the same function (checked on the held-out set), re-basin must recover the permutation, so its merge equals A
  and the barrier is exactly zero (with `tolerance 0`, the paper's stopping rule: the default 1 % tolerance is an
  early stop on the objective's gain and, with whole-head symmetries, measurably stops a sweep or two before the
  last transformer block of a 16-step model lines up), while the weighted sum of A and B falls off a barrier.
  Activation matching must recover it too (its alignment is then a weighted sum of A with itself);
- same base: fine-tunes of one base line up already, so re-basin matches the identity and its merge equals the
  weighted sum bit for bit.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file

from lib_rebasin.align.permute import permute_tensor, random_perms
from lib_rebasin.io.checkpoint import memory_checkpoint
from lib_rebasin.sd1.spec import build_spec

from .evaluate import EvalSet, Model, heldout_loss
from .export import single_file
from .layout import sd_config
from .merging import merge
from .method_lines import ACTIVATIONS, REBASIN, REBASIN_EXACT, WEIGHTED_SUM
from .train import Trained


def planted_permutation(width: int, a: Trained, es: EvalSet, work: Path, seed: int = 7,
                        match_images: int = 64, activation_prompts: int = 16, export: bool = True) -> dict:
    spec = build_spec(sd_config(width))
    perms = random_perms(spec.groups_in(("unet", "te")), seed)
    a_path = single_file(a, export)
    ldm_a = load_file(str(a_path))
    ldm_b = {k: permute_tensor(spec, k, v, perms) for k, v in ldm_a.items()}
    moved = sum(int((p != torch.arange(len(p))).sum()) for p in perms.values())
    # B is merged from memory: the merges read it through the same API as a file (merge_in_memory takes either),
    # and the control is about the permutation, not about reading B's file.
    b = memory_checkpoint(ldm_b, name="planted")
    loss_a = heldout_loss(Model(width, ldm_a), es)["mean"]
    loss_b = heldout_loss(Model(width, ldm_b), es)["mean"]
    rb = merge(a_path, b, REBASIN_EXACT, 0.5, work)
    ws = merge(a_path, b, WEIGHTED_SUM, 0.5, work)
    activations = replace(ACTIVATIONS, options={**ACTIVATIONS.options, "activation_samples": activation_prompts})
    am = merge(a_path, b, activations, 0.5, work, match_images=match_images)
    loss_rb = heldout_loss(Model(width, rb.ldm), es)["mean"]
    loss_ws = heldout_loss(Model(width, ws.ldm), es)["mean"]
    max_diff = max(float((rb.ldm[k].float() - v.float()).abs().max()) for k, v in ldm_a.items())
    am_diff = max(float((am.ldm[k].float() - v.float()).abs().max()) for k, v in ldm_a.items())
    mid = (loss_a + loss_b) / 2
    return {"units_permuted": moved, "loss_a": loss_a, "loss_b": loss_b,
            "rebasin_barrier": loss_rb - mid, "weighted_sum_barrier": loss_ws - mid,
            "rebasin_merge_max_abs_diff_from_a": max_diff, "activation_matching_max_abs_diff_from_a": am_diff}


def same_base_identity(a: Trained, b: Trained, work: Path, export: bool = True) -> dict:
    rb = merge(single_file(a, export), single_file(b, export), REBASIN, 0.5, work)
    ws = merge(single_file(a, export), single_file(b, export), WEIGHTED_SUM, 0.5, work)
    differing = [k for k in ws.ldm if not torch.equal(ws.ldm[k], rb.ldm[k])]
    return {"units_moved": sum(m for m, _ in rb.moved.values()), "keys": len(ws.ldm),
            "keys_differing": len(differing), "bit_identical": not differing and set(ws.ldm) == set(rb.ldm)}
