"""SDXL's data-free inputs for activation matching and REPAIR: SD 1.x's (`sd1/activation_inputs.py`: seeded
prompts, model A's DDIM trajectory under classifier-free guidance at the same timesteps; SDXL base trains on SD 1.x's
scaled-linear schedule and 4-channel latents) with SDXL's prompt layout.

Each prompt is one row of ids per text encoder, laid out as the WebUI's SDXL tokenizers lay it out: BOS, 5-20
seeded tokens, EOS, then CLIP-L's row padded with EOS and CLIP-G's with 0 (OpenCLIP's padding); the last row is the
empty prompt. The size/crop conditioning is `forward.SIZE_CONDITIONING` (a 1024 x 1024 image, uncropped).
"""

from __future__ import annotations

import torch

from ..sd1.activation_inputs import PROMPT_TOKENS
from .config import SDXLConfig

CLIP_G_PAD = 0


def special_tokens(c: SDXLConfig) -> tuple[int, int]:
    """(BOS, EOS): CLIP's 49406/49407, or the last two ids of a reduced vocabulary (the test models' rule)."""
    vocab = min(c.clip_l_vocab, c.clip_g_vocab)
    return (49406, 49407) if vocab > 49407 else (vocab - 2, vocab - 1)


def prompts(c: SDXLConfig, n: int, generator: torch.Generator) -> torch.Tensor:
    """(n + 1, 2, positions) token ids: n seeded prompts, then the empty prompt; CLIP-L's row, then CLIP-G's."""
    bos, eos = special_tokens(c)
    ids = torch.full((n + 1, 2, c.text_positions), eos, dtype=torch.long)
    lo, hi = PROMPT_TOKENS
    for i in range(n + 1):
        length = 0
        if i < n:
            length = int(torch.randint(lo, min(hi, c.text_positions - 2) + 1, (1,), generator=generator))
            ids[i, :, 1:1 + length] = torch.randint(0, min(bos, eos), (length,), generator=generator)
        ids[i, 1, 2 + length:] = CLIP_G_PAD
    ids[:, :, 0] = bos
    return ids
