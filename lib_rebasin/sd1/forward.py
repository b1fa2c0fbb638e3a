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
    resblock,
    spatial_transformer,
    timestep_embedding,
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
    h = L.conv(f"{P}input_blocks.0.0", x)
    skips = [h]
    idx = 1
    for level in range(len(c.channel_mult)):
        for _ in range(c.num_res_blocks):
            p = f"{P}input_blocks.{idx}"
            h = resblock(L, f"{p}.0", h, emb, c.gn_groups)
            if level in c.attention_levels:
                h = spatial_transformer(L, f"{p}.1", h, context, c.unet_heads, c.gn_groups)
            skips.append(h)
            idx += 1
        if level != len(c.channel_mult) - 1:
            h = L.conv(f"{P}input_blocks.{idx}.0.op", h, stride=2)
            skips.append(h)
            idx += 1
    h = resblock(L, f"{P}middle_block.0", h, emb, c.gn_groups)
    h = spatial_transformer(L, f"{P}middle_block.1", h, context, c.unet_heads, c.gn_groups)
    h = resblock(L, f"{P}middle_block.2", h, emb, c.gn_groups)
    idx = 0
    for level in reversed(range(len(c.channel_mult))):
        for i in range(c.num_res_blocks + 1):
            p = f"{P}output_blocks.{idx}"
            h = resblock(L, f"{p}.0", torch.cat([h, skips.pop()], dim=1), emb, c.gn_groups)
            sub = 1
            if level in c.attention_levels:
                h = spatial_transformer(L, f"{p}.1", h, context, c.unet_heads, c.gn_groups)
                sub = 2
            if level and i == c.num_res_blocks:
                h = L.conv(f"{p}.{sub}.conv", F.interpolate(h, scale_factor=2.0, mode="nearest"))
            idx += 1
    return L.conv(f"{P}out.2", F.silu(L.group_norm(f"{P}out.0", h, c.gn_groups)))
