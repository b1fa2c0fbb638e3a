"""A trained model as the single-file (LDM) checkpoint users merge: its UNet and text encoder plus the shared,
unused VAE (see layout.py). Written once next to the cached model; merges read these files."""

from __future__ import annotations

import os
from pathlib import Path

from safetensors.torch import load_file, save_file

from .layout import sd_config, vae_ldm
from .train import Trained


def single_file(t: Trained, export: bool = True) -> Path:
    """The model's single-file checkpoint, written the first time; `export=False`: the trained file itself (its UNet
    and text encoder, all that a merge of the benchmark's parts reads; a profile that never needs the VAE)."""
    if not export:
        return t.path
    out = t.path.with_name(t.path.stem + "-sd15layout.safetensors")
    if not out.exists():
        ldm = load_file(str(t.path))
        ldm.update(vae_ldm(sd_config(t.config.width)))
        tmp = out.with_suffix(".tmp")
        save_file(ldm, str(tmp), metadata={"benchmark": "quality", "config": t.config.describe()})
        os.replace(tmp, out)
    return out
