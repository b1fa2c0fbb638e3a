"""Every merge goes through lib_rebasin's public API from the parents' files: `merge_in_memory`, which gives the
tensors `merge_checkpoints` writes (the core's tests hold them equal byte for byte) without writing a file that
would only be read back and removed."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lib_rebasin.io.checkpoint import Checkpoint, memory_checkpoint
from lib_rebasin.merge.run import merge_in_memory
from lib_rebasin.options import MergeOptions

from .method_lines import Method

PARTS = ("unet", "te")


@dataclass
class Merged:
    ldm: dict[str, torch.Tensor]
    summary: list[str]          # the merge's own diagnostics, in words
    seconds: float                                # the merge call (plus the activation matching, if any)
    moved: dict[str, list[int]]                   # part -> [units moved, units] (re-basin)
    similarity: dict[str, tuple[float, float]]    # part -> cosine similarity of B to A before / after matching


_ALIGNED: dict[tuple[Path, Path, str, int], tuple[Path, float]] = {}


def aligned(a: Path, b: Path | Checkpoint, how: str, work: Path,
            match_images: int = 64) -> tuple[Path | Checkpoint, float]:
    """B permuted onto A by `how` ("activations", on `match_images` training images at every matching t),
    written once per pair (a B held in memory, the planted control's, is permuted in memory: it has no file to
    name the result by, and nothing reuses it); also the seconds matching took."""
    in_memory = isinstance(b, Checkpoint)
    key = (a, b, how, match_images)
    if in_memory or key not in _ALIGNED or not _ALIGNED[key][0].exists():
        from lib_rebasin.sd1.spec import build_spec

        from .activations import activation_perms, permuted_copy
        from .layout import UNET_PREFIX, sd_config

        ldm_a = load_file(str(a))
        ldm_b = {k: b.get(k) for k in b} if isinstance(b, Checkpoint) else load_file(str(b))
        width = ldm_a[UNET_PREFIX + "input_blocks.0.0.weight"].shape[0]
        start = time.perf_counter()
        perms = activation_perms(width, ldm_a, ldm_b, n_images=match_images)
        seconds = time.perf_counter() - start
        permuted = permuted_copy(build_spec(sd_config(width)), ldm_b, perms)
        if isinstance(b, Checkpoint):
            return memory_checkpoint(permuted, name=f"{b.path.name.strip('<>')}-aligned-to-{a.stem}-{how}"), seconds
        # Per process, and written atomically: several benchmark processes may share the work folder.
        out = work / f"{b.stem}-aligned-to-{a.stem}-{how}-{os.getpid()}.safetensors"
        tmp = out.with_suffix(".tmp")
        save_file(permuted, str(tmp))
        os.replace(tmp, out)
        _ALIGNED[key] = (out, seconds)
    return _ALIGNED[key]


def merge(a: Path, b: Path | Checkpoint, method: Method, alpha: float, work: Path, base: Path | None = None,
          match_images: int = 64) -> Merged:
    """`method`'s merge of A and B (a file, or a checkpoint held in memory) at `alpha`, held in memory."""
    if method.needs_base and base is None:
        raise ValueError(f"{method.label} needs the family's base as model C")
    work.mkdir(parents=True, exist_ok=True)
    align_seconds = 0.0
    if method.align is not None:
        b, align_seconds = aligned(a, b, method.align, work, match_images)
    # The VAE is shared and unused (see layout.py): merge the UNet and the text encoder, as a user would.
    options = MergeOptions(**{"method": method.method, "alpha": alpha, "precision": "fp32", "parts": PARTS,
                              **method.options})
    start = time.perf_counter()
    merged, d = merge_in_memory(a, b, options, c=base if method.needs_base else None)
    seconds = time.perf_counter() - start
    ldm = {k: merged.get(k) for k in merged}
    similarity = {p: cos for p in d.objective if (cos := d.cosine(p)) is not None}
    return Merged(ldm, d.summary_lines(), seconds + align_seconds, dict(d.moved), similarity)
