"""The parts of a checkpoint a merge can take (UNet, text encoder(s), VAE), for every architecture.

The key prefixes of SD 1.x and SDXL do not overlap except where they mean the same part (the UNet and the VAE),
so one `part_of` answers for both: the merge, the checks and the reports ask it without knowing the architecture.
"""

from __future__ import annotations

# The parts a merge can take, in checkpoint order, and their names in a sentence (capitalise the first letter to
# start a label with one). "te" is every text encoder of the model (SD 1.x: CLIP-L; SDXL: CLIP-L and CLIP-G).
PARTS = ("unet", "te", "vae")
PART_NAMES = {"unet": "UNet", "te": "text encoder", "vae": "VAE"}

UNET = "model.diffusion_model."
VAE = "first_stage_model."
_PREFIXES = (
    (UNET, "unet"),
    ("cond_stage_model.", "te"),          # SD 1.x: CLIP-L (transformers' layout)
    ("conditioner.embedders.", "te"),     # SDXL: CLIP-L and OpenCLIP ViT-bigG
    (VAE, "vae"),
)


def part_of(key: str) -> str:
    """Which model part a checkpoint key belongs to ('other' for buffers, markers and unknown keys)."""
    for prefix, part in _PREFIXES:
        if key.startswith(prefix):
            return part
    return "other"
