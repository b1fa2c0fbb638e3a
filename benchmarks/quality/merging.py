"""Every merge goes through lib_rebasin's public API (`merge_checkpoints`), file in, file out, exactly as the CLI
runs it; the result is read back and the temporary file removed."""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from lib_rebasin.merge import MergeOptions, merge_checkpoints

from .methods import Method

PARTS = ("unet", "te")


@dataclass
class Merged:
    ldm: dict[str, torch.Tensor]
    summary: list[str]          # the merge's own diagnostics, in words
    seconds: float
    moved: dict[str, list[int]]


def merge(a: Path, b: Path, method: Method, alpha: float, work: Path, base: Path | None = None) -> Merged:
    if method.needs_base and base is None:
        raise ValueError(f"{method.label} needs the family's base as model C")
    # The VAE is shared and unused (see layout.py): merge the UNet and the text encoder, as a user would.
    options = MergeOptions(method=method.method, alpha=alpha, precision="fp32", parts=PARTS, **method.options)
    work.mkdir(parents=True, exist_ok=True)
    out = work / f"merge-{os.getpid()}-{uuid.uuid4().hex[:8]}.safetensors"
    start = time.perf_counter()
    try:
        result = merge_checkpoints(a, b, out, options, c=base if method.needs_base else None)
        seconds = time.perf_counter() - start
        ldm = load_file(str(out))
    finally:
        out.unlink(missing_ok=True)
    d = result.diagnostics
    return Merged(ldm, d.summary_lines(), seconds, dict(d.moved))
