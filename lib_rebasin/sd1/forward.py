"""A host-free forward pass of SD 1.x from an LDM-layout state dict: the UNet (epsilon) and the CLIP-L text encoder.

Plain torch over a tensor getter, so a checkpoint is never loaded whole: each layer reads its weights when it runs
(from the page cache, or from a blend of models) and widens them to fp32. Every convolution and linear layer
reports its output to `observe(layer, output)`, `layer` being its checkpoint key without `.weight`; those are the
activation sites of `activation_matching` (a group's units are a window of such an output's channels). A layer that
writes into a residual stream (`residual=`) reports either its own output (REPAIR corrects what each writer adds)
or, with `Layers(streams=True)`, the stream after its addition (activation matching: the sum is what the stream's
permutation acts on, and it carries everything upstream wrote, where one branch's output is a weak signal).

Written from the LDM reference implementation (openaimodel.py, attention.py) and CLIP; the tests check it equals
diffusers' UNet2DConditionModel and transformers' CLIPTextModel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import RebasinError
from ..forward_layers import (
    Layers,
    Observer,
    TensorGetter,
    channels_last,
    spatial_transformer,
    timestep_embedding,
    unet_body,
)
from ..parts import UNET
from .config import SD1Config
from .spec import TE

__all__ = ["Layers", "Observer", "TensorGetter", "channels_last", "check_plain_unets", "text_encoder",
           "timestep_embedding", "unet"]


def check_plain_unets(a: SD1Config, b: SD1Config, who: str, instead: str) -> None:
    """`who` runs both UNets on the same 4-channel latents: plain SD 1.x UNets only (inpainting and
    instruct-pix2pix inputs have channels no data-free input fills)."""
    for label, c in (("A", a), ("B", b)):
        if c.unet_in_channels != c.unet_out_channels:
            raise RebasinError(f"{who} runs plain SD 1.x UNets; model {label} is {c.variant} "
                               f"({c.unet_in_channels} input channels). {instead}")


# -- CLIP-L text encoder ---------------------------------------------------------------------------------------
@torch.no_grad()
def text_encoder(c: SD1Config, L: Layers, ids: torch.Tensor) -> torch.Tensor:
    """Token ids (batch, 77) -> the last hidden state after the final layer norm (what SD 1.x conditions on)."""
    x = L.w(f"{TE}embeddings.token_embedding.weight")[ids] + L.w(f"{TE}embeddings.position_embedding.weight")[
        : ids.shape[1]]
    for i in range(c.te_layers):
        p = f"{TE}encoder.layers.{i}"
        h = L.layer_norm(f"{p}.layer_norm1", x)
        x = L.attention(f"{p}.self_attn", h, h, c.te_heads, ("q_proj", "k_proj", "v_proj", "out_proj"),
                        bias=True, causal=True, residual=x)
        h = L.linear(f"{p}.mlp.fc1", L.layer_norm(f"{p}.layer_norm2", x))
        x = L.linear(f"{p}.mlp.fc2", h * torch.sigmoid(1.702 * h), residual=x)  # quick_gelu
    return L.layer_norm(f"{TE}final_layer_norm", x)


# -- UNet ------------------------------------------------------------------------------------------------------
@torch.no_grad()
def unet(c: SD1Config, L: Layers, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """The predicted noise for latents x (batch, in_channels, h, w) at timesteps t (batch,) under `context`."""
    P = UNET
    emb = L.linear(f"{P}time_embed.2", F.silu(L.linear(f"{P}time_embed.0",
                                                      timestep_embedding(t, c.model_channels))))
    return unet_body(L, x, emb, c.channel_mult, c.num_res_blocks, c.gn_groups,
                     lambda level: level in c.attention_levels,
                     lambda p, h, _: spatial_transformer(L, p, h, context, c.unet_heads, c.gn_groups))
