"""The host-free forward passes activation matching and REPAIR run, one per architecture (SD 1.x: `sd1/forward.py`,
SDXL: `sdxl/forward.py`, each proven equal to diffusers/transformers by the tests), and which pairs they can run.

Both architectures share the matching and repair logic: it calls an `ArchForward`'s three functions and the shared
latents, schedule and trajectory of `sd1/activation_inputs.py`; only what differs is dispatched on here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import RebasinError
from ..forward_layers import Layers
from ..io.model_input import ModelConfig
from ..sd1 import activation_inputs as sd1_inputs
from ..sd1 import forward as sd1_forward
from ..sd1.config import SD1Config
from ..sdxl import activation_inputs as sdxl_inputs
from ..sdxl import forward as sdxl_forward
from ..sdxl.config import SDXLConfig


@dataclass(frozen=True)
class ArchForward:
    """One architecture's forward pass and prompts. The conditioning `text_encoder` returns (SD 1.x: the context
    tensor; SDXL: a `Conditioning`) is opaque to the callers: they only take its rows (`cond[rows]`) and hand it to
    `unet`."""
    prompts: Callable[[Any, int, torch.Generator], torch.Tensor]   # (config, n, generator) -> n + 1 prompts' ids
    text_encoder: Callable[[Any, Layers, torch.Tensor], Any]       # (config, layers, ids) -> conditioning
    unet: Callable[[Any, Layers, torch.Tensor, torch.Tensor, Any], torch.Tensor]  # (config, layers, x, t, cond)


SD1 = ArchForward(sd1_inputs.prompts, sd1_forward.text_encoder, sd1_forward.unet)
SDXL = ArchForward(sdxl_inputs.prompts, sdxl_forward.text_encoder, sdxl_forward.unet)


def forward_of(config: ModelConfig) -> ArchForward:
    return SDXL if isinstance(config, SDXLConfig) else SD1


def check_forward_supported(a: ModelConfig, b: ModelConfig, what: str, advice: str) -> None:
    """Refuse, in one line, a pair no forward pass here can run (inpainting and other extra-input UNets)."""
    if isinstance(a, SD1Config) and isinstance(b, SD1Config):
        sd1_forward.check_plain_unets(a, b, what, advice)
    elif isinstance(a, SDXLConfig) and isinstance(b, SDXLConfig):
        sdxl_forward.check_plain_unets(a, b, what, advice)
    else:  # merge preflight refuses a mixed pair before this; kept for direct callers
        raise RebasinError(f"{what} runs both models' forward passes on the same inputs; models of different "
                           f"architectures cannot be compared. {advice}")
