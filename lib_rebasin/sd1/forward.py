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

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..errors import RebasinError
from ..parts import UNET
from .config import SD1Config
from .spec import TE

TensorGetter = Callable[[str], torch.Tensor]
# An observer may return a tensor to use in place of the layer's output (REPAIR corrects the merge as it runs).
Observer = Callable[[str, torch.Tensor], "torch.Tensor | None"]


def channels_last(out: torch.Tensor) -> torch.Tensor:
    """A layer output as (samples, channels), what per-unit statistics are taken over: conv (N, C, H, W),
    linear (N, L, C) or (N, C)."""
    if out.dim() == 4:
        return out.permute(0, 2, 3, 1).reshape(-1, out.shape[1])
    return out.reshape(-1, out.shape[-1])


def check_plain_unets(a: SD1Config, b: SD1Config, who: str, instead: str) -> None:
    """`who` runs both UNets on the same 4-channel latents: plain SD 1.x UNets only (inpainting and
    instruct-pix2pix inputs have channels no data-free input fills)."""
    for label, c in (("A", a), ("B", b)):
        if c.unet_in_channels != c.unet_out_channels:
            raise RebasinError(f"{who} runs plain SD 1.x UNets; model {label} is {c.variant} "
                               f"({c.unet_in_channels} input channels). {instead}")


class Layers:
    """The layer primitives over one model's weights; `observe` sees each conv/linear output (with
    streams=True, a residual writer's stream after its addition instead)."""

    def __init__(self, get: TensorGetter, observe: Observer | None = None,
                 device: torch.device = torch.device("cpu"), streams: bool = False) -> None:
        self.get = get
        self.observe = observe
        self.device = device
        self.streams = streams

    def w(self, key: str) -> torch.Tensor:
        return self.get(key).to(self.device, torch.float32)

    def _seen(self, name: str, out: torch.Tensor) -> torch.Tensor:
        if self.observe is not None:
            replaced = self.observe(name, out)
            if replaced is not None:
                return replaced
        return out

    def _written(self, name: str, out: torch.Tensor, residual: torch.Tensor | None, partial: bool) -> torch.Tensor:
        """`out` (plus `residual`, the stream it adds to), observed as the writer's output or the stream's sum.
        A `partial` writer (a ResBlock's skip convolution) is one term of a sum another layer reports: in streams
        mode it is not observed on its own."""
        if residual is None:
            return out if partial and self.streams else self._seen(name, out)
        return self._seen(name, residual + out) if self.streams else residual + self._seen(name, out)

    def linear(self, name: str, x: torch.Tensor, bias: bool = True,
               residual: torch.Tensor | None = None) -> torch.Tensor:
        out = F.linear(x, self.w(f"{name}.weight"), self.w(f"{name}.bias") if bias else None)
        return self._written(name, out, residual, False)

    def conv(self, name: str, x: torch.Tensor, stride: int = 1, residual: torch.Tensor | None = None,
             partial: bool = False) -> torch.Tensor:
        w = self.w(f"{name}.weight")
        out = F.conv2d(x, w, self.w(f"{name}.bias"), stride=stride, padding=w.shape[-1] // 2)
        return self._written(name, out, residual, partial)

    def group_norm(self, name: str, x: torch.Tensor, groups: int, eps: float = 1e-5) -> torch.Tensor:
        return F.group_norm(x, groups, self.w(f"{name}.weight"), self.w(f"{name}.bias"), eps)

    def layer_norm(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.w(f"{name}.weight"), self.w(f"{name}.bias"), 1e-5)

    def attention(self, p: str, x: torch.Tensor, context: torch.Tensor, heads: int, names: tuple[str, ...],
                  bias: bool, causal: bool = False, residual: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v, o = (f"{p}.{n}" for n in names)
        b, n, width = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:  # (b, n, heads * d) -> (b, heads, n, d)
            return t.reshape(b, t.shape[1], heads, width // heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.linear(q, x, bias)), split(self.linear(k, context, bias)),
                                             split(self.linear(v, context, bias)), is_causal=causal)
        return self.linear(o, out.transpose(1, 2).reshape(b, n, width), residual=residual)


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
def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """LDM's sinusoidal embedding: [cos, sin] of t times geometrically spaced frequencies."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _resblock(c: SD1Config, L: Layers, p: str, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    h = L.conv(f"{p}.in_layers.2", F.silu(L.group_norm(f"{p}.in_layers.0", x, c.gn_groups)))
    h = h + L.linear(f"{p}.emb_layers.1", F.silu(emb))[:, :, None, None]
    # A ResBlock has a 1x1 skip convolution exactly when it changes the channel count (the spec's rule too).
    skip = L.conv(f"{p}.skip_connection", x, partial=True) if x.shape[1] != h.shape[1] else x
    return L.conv(f"{p}.out_layers.3", F.silu(L.group_norm(f"{p}.out_layers.0", h, c.gn_groups)), residual=skip)


def _transformer(c: SD1Config, L: Layers, p: str, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    b, ch, hh, ww = x.shape
    h = L.conv(f"{p}.proj_in", L.group_norm(f"{p}.norm", x, c.gn_groups, eps=1e-6))
    h = h.permute(0, 2, 3, 1).reshape(b, hh * ww, ch)
    t = f"{p}.transformer_blocks.0"
    names = ("to_q", "to_k", "to_v", "to_out.0")
    n1 = L.layer_norm(f"{t}.norm1", h)
    h = L.attention(f"{t}.attn1", n1, n1, c.unet_heads, names, bias=False, residual=h)
    h = L.attention(f"{t}.attn2", L.layer_norm(f"{t}.norm2", h), context, c.unet_heads, names, bias=False,
                    residual=h)
    value, gate = L.linear(f"{t}.ff.net.0.proj", L.layer_norm(f"{t}.norm3", h)).chunk(2, dim=-1)
    h = L.linear(f"{t}.ff.net.2", value * F.gelu(gate), residual=h)  # GEGLU
    h = h.reshape(b, hh, ww, ch).permute(0, 3, 1, 2)
    return L.conv(f"{p}.proj_out", h, residual=x)


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
            h = _resblock(c, L, f"{p}.0", h, emb)
            if level in c.attention_levels:
                h = _transformer(c, L, f"{p}.1", h, context)
            skips.append(h)
            idx += 1
        if level != len(c.channel_mult) - 1:
            h = L.conv(f"{P}input_blocks.{idx}.0.op", h, stride=2)
            skips.append(h)
            idx += 1
    h = _resblock(c, L, f"{P}middle_block.0", h, emb)
    h = _transformer(c, L, f"{P}middle_block.1", h, context)
    h = _resblock(c, L, f"{P}middle_block.2", h, emb)
    idx = 0
    for level in reversed(range(len(c.channel_mult))):
        for i in range(c.num_res_blocks + 1):
            p = f"{P}output_blocks.{idx}"
            h = _resblock(c, L, f"{p}.0", torch.cat([h, skips.pop()], dim=1), emb)
            sub = 1
            if level in c.attention_levels:
                h = _transformer(c, L, f"{p}.1", h, context)
                sub = 2
            if level and i == c.num_res_blocks:
                h = L.conv(f"{p}.{sub}.conv", F.interpolate(h, scale_factor=2.0, mode="nearest"))
            idx += 1
    return L.conv(f"{P}out.2", F.silu(L.group_norm(f"{P}out.0", h, c.gn_groups)))
