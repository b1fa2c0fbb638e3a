"""Stand-in for modules.sd_vae: the VAE registry (`vae_dict`, name -> file) and `refresh_vae_list`.

Follows A1111 1.10's rules: every .ckpt/.pt/.safetensors under models/VAE (or --vae-dir), plus files named
*.vae.ckpt / *.vae.pt / *.vae.safetensors among the checkpoints; a VAE's name is its file name."""

import glob
import os

from . import record, sd_models, shared

vae_path = os.path.abspath("models/VAE")  # tests point this at a tmp folder
vae_dict: dict = {}


def refresh_vae_list():
    record("sd_vae.refresh_vae_list")
    vae_dict.clear()
    patterns = [os.path.join(sd_models.model_path, "**", f"*.vae.{ext}") for ext in ("ckpt", "pt", "safetensors")]
    patterns += [os.path.join(vae_path, "**", f"*.{ext}") for ext in ("ckpt", "pt", "safetensors")]
    vae_dir = getattr(shared.cmd_opts, "vae_dir", None)
    if vae_dir and os.path.isdir(vae_dir):
        patterns += [os.path.join(vae_dir, "**", f"*.{ext}") for ext in ("ckpt", "pt", "safetensors")]
    for pattern in patterns:
        for filepath in glob.iglob(pattern, recursive=True):
            vae_dict[os.path.basename(filepath)] = filepath
    vae_dict.update(dict(sorted(vae_dict.items(), key=lambda item: item[0].lower())))
