"""A host-free forward pass of SDXL from a single-file (SGM) state dict: the UNet (epsilon, with its ADM vector) and
both text encoders, on the layer primitives of `forward_layers.py` (weights read layer by layer from a getter,
every conv/linear output reported to the observer: the activation sites of activation matching and REPAIR, as for
SD 1.x in `sd1/forward.py`).

What SDXL conditions on, as SGM's conditioner builds it:
- `context`: both encoders' penultimate hidden states (the stream after the last layer but one, no final norm)
  side by side, CLIP-L's then CLIP-G's;
- `pooled`: CLIP-G's last hidden state after `ln_final`, at the end-of-text token (the highest id, OpenCLIP's
  rule), times `text_projection`;
- the ADM vector `label_emb` reads: `pooled`, then the six size/crop values (original size, crop offset, target
  size) each through a sinusoidal embedding as wide as the ADM's rest / 6; its output is added to the time
  embedding.
The last layer of CLIP-L only feeds outputs SDXL does not use; it runs all the same, so that its groups have
activations to match.

Written from SGM (openaimodel.py, encoders/modules.py) and OpenCLIP; the tests check it equals diffusers'
UNet2DConditionModel (`text_time`) and transformers' CLIPTextModel / CLIPTextModelWithProjection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import RebasinError
from ..forward_layers import Layers, spatial_transformer, timestep_embedding, unet_body
from ..parts import UNET
from .config import CLIP_G, CLIP_L, SDXLConfig

# Keys SDXL files may leave out (sdxl/spec.py's OPTIONAL) that the pooled conditioning needs.
POOLED_KEYS = (f"{CLIP_G}ln_final.weight", f"{CLIP_G}ln_final.bias", f"{CLIP_G}text_projection")
SIZE_VALUES = 6  # original height and width, crop top and left, target height and width
# The size/crop values the data-free passes condition on: a 1024 x 1024 image, uncropped, what SDXL generates at.
SIZE_CONDITIONING = (1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0)


@dataclass(frozen=True)
class Conditioning:
    """What SDXL's UNet is conditioned on, per batch row: the cross-attention context, CLIP-G's pooled projection
    and the size/crop values. Rows are taken like a tensor's (`cond[rows]`)."""
    context: torch.Tensor   # (batch, positions, clip_l_width + clip_g_width)
    pooled: torch.Tensor    # (batch, clip_g_projection)
    sizes: torch.Tensor     # (batch, 6)

    def __getitem__(self, rows: Any) -> Conditioning:
        return Conditioning(self.context[rows], self.pooled[rows], self.sizes[rows])


def check_plain_unets(a: SDXLConfig, b: SDXLConfig, who: str, instead: str) -> None:
    """`who` runs both UNets on the same 4-channel latents: plain SDXL UNets only (an inpainting UNet's extra input
    channels are not filled by any data-free input)."""
    for label, c in (("A", a), ("B", b)):
        if c.unet_in_channels != c.unet_out_channels:
            raise RebasinError(f"{who} runs plain SDXL UNets; model {label} is {c.variant} "
                               f"({c.unet_in_channels} input channels). {instead}")


# -- text encoders -----------------------------------------------------------------------------------------------
def clip_l(c: SDXLConfig, L: Layers, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP-L (transformers' layout): token ids (batch, positions) -> (penultimate hidden state, last stream before
    the final norm)."""
    x = L.w(f"{CLIP_L}embeddings.token_embedding.weight")[ids] + L.w(
        f"{CLIP_L}embeddings.position_embedding.weight")[: ids.shape[1]]
    penultimate = x
    for i in range(c.clip_l_layers):
        p = f"{CLIP_L}encoder.layers.{i}"
        h = L.layer_norm(f"{p}.layer_norm1", x)
        x = L.attention(f"{p}.self_attn", h, h, c.heads(c.clip_l_width), ("q_proj", "k_proj", "v_proj", "out_proj"),
                        bias=True, causal=True, residual=x)
        h = L.linear(f"{p}.mlp.fc1", L.layer_norm(f"{p}.layer_norm2", x))
        x = L.linear(f"{p}.mlp.fc2", h * torch.sigmoid(1.702 * h), residual=x)  # quick_gelu
        if i == c.clip_l_layers - 2:
            penultimate = x
    return penultimate, x


def clip_g(c: SDXLConfig, L: Layers, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """OpenCLIP ViT-bigG (OpenCLIP's layout): token ids (batch, positions) -> (penultimate hidden state, last hidden
    state after `ln_final`)."""
    x = L.w(f"{CLIP_G}token_embedding.weight")[ids] + L.w(f"{CLIP_G}positional_embedding")[: ids.shape[1]]
    penultimate = x
    for i in range(c.clip_g_layers):
        p = f"{CLIP_G}transformer.resblocks.{i}"
        x = L.fused_attention(f"{p}.attn", L.layer_norm(f"{p}.ln_1", x), c.heads(c.clip_g_width), causal=True,
                              residual=x)
        x = L.linear(f"{p}.mlp.c_proj", F.gelu(L.linear(f"{p}.mlp.c_fc", L.layer_norm(f"{p}.ln_2", x))), residual=x)
        if i == c.clip_g_layers - 2:
            penultimate = x
    return penultimate, L.layer_norm(f"{CLIP_G}ln_final", x)


def pooled(L: Layers, last: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """CLIP-G's pooled projection: the last hidden state at the end-of-text token (the highest id) times
    `text_projection`."""
    return last[torch.arange(ids.shape[0], device=ids.device), ids.argmax(-1)] @ L.w(f"{CLIP_G}text_projection")


@torch.no_grad()
def text_encoder(c: SDXLConfig, L: Layers, ids: torch.Tensor) -> Conditioning:
    """Token ids -> the UNet's conditioning. `ids` is (batch, positions), the same ids for both encoders, or
    (batch, 2, positions): CLIP-L's then CLIP-G's (the WebUI pads them differently)."""
    for key in POOLED_KEYS:  # before any work: a pruned file cannot give the UNet its pooled conditioning
        try:
            L.get(key)
        except KeyError:
            raise RebasinError(f"This SDXL model has no '{key}' (a pruned file); the SDXL forward pass that activation "
                               "matching and REPAIR run needs CLIP-G's final norm and projection.") from None
    ids_l, ids_g = (ids[:, 0], ids[:, 1]) if ids.dim() == 3 else (ids, ids)
    context_l, _ = clip_l(c, L, ids_l)
    context_g, last_g = clip_g(c, L, ids_g)
    sizes = torch.tensor(SIZE_CONDITIONING, device=last_g.device).expand(ids.shape[0], -1)
    return Conditioning(torch.cat([context_l, context_g], dim=-1), pooled(L, last_g, ids_g), sizes)


# -- UNet --------------------------------------------------------------------------------------------------------
def adm_input(c: SDXLConfig, cond: Conditioning) -> torch.Tensor:
    """The `label_emb` input: the pooled projection, then each size/crop value's sinusoidal embedding."""
    width = (c.adm_channels - c.clip_g_projection) // SIZE_VALUES
    sizes = timestep_embedding(cond.sizes.reshape(-1), width).reshape(cond.sizes.shape[0], -1)
    return torch.cat([cond.pooled, sizes.to(cond.pooled)], dim=-1)


@torch.no_grad()
def unet(c: SDXLConfig, L: Layers, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """The predicted noise for latents x (batch, in_channels, h, w) at timesteps t (batch,) under `cond`."""
    P = UNET
    emb = L.linear(f"{P}time_embed.2", F.silu(L.linear(f"{P}time_embed.0", timestep_embedding(t, c.model_channels))))
    emb = L.linear(f"{P}label_emb.0.2", F.silu(L.linear(f"{P}label_emb.0.0", adm_input(c, cond))), residual=emb)

    def transformer(p: str, h: torch.Tensor, level: int) -> torch.Tensor:
        return spatial_transformer(L, p, h, cond.context, c.heads(h.shape[1]), c.gn_groups, c.transformer_depth[level],
                                   linear=True)

    return unet_body(L, x, emb, c.channel_mult, c.num_res_blocks, c.gn_groups,
                     lambda level: bool(c.transformer_depth[level]), transformer)
