"""The layer primitives of the host-free forward passes (`sd1/forward.py`, `sdxl/forward.py`): plain torch over a
tensor getter, each layer reading its weights when it runs and widening them to fp32, every convolution and linear
layer reporting its output to an observer (the activation sites of activation matching and REPAIR; see
`sd1/forward.py`). The UNet blocks both architectures share (the ResBlock, the spatial transformer) are here too."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .memory import heap_blocks
from .parts import UNET

TensorGetter = Callable[[str], torch.Tensor]
# An observer may return a tensor to use in place of the layer's output (REPAIR corrects the merge as it runs).
Observer = Callable[[str, torch.Tensor], "torch.Tensor | None"]


def channels_last(out: torch.Tensor) -> torch.Tensor:
    """A layer output as (samples, channels), what per-unit statistics are taken over: conv (N, C, H, W),
    linear (N, L, C) or (N, C)."""
    if out.dim() == 4:
        return out.permute(0, 2, 3, 1).reshape(-1, out.shape[1])
    return out.reshape(-1, out.shape[-1])


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
        # Read, widened and freed once the layer has run, at every call: from the heap even inside activation
        # matching's own mappings (`memory.heap_blocks`).
        with heap_blocks():
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
        out = _attend(self.linear(q, x, bias), self.linear(k, context, bias), self.linear(v, context, bias), heads,
                      causal)
        return self.linear(o, out, residual=residual)

    def fused_attention(self, p: str, x: torch.Tensor, heads: int, causal: bool = False,
                        residual: torch.Tensor | None = None) -> torch.Tensor:
        """OpenCLIP's self-attention: q, k and v from one `in_proj` (rows q | k | v), observed as `{p}.in_proj`."""
        qkv = self._seen(f"{p}.in_proj", F.linear(x, self.w(f"{p}.in_proj_weight"), self.w(f"{p}.in_proj_bias")))
        q, k, v = qkv.chunk(3, dim=-1)
        return self.linear(f"{p}.out_proj", _attend(q, k, v, heads, causal), residual=residual)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, causal: bool) -> torch.Tensor:
    """Multi-head scaled dot-product attention over (batch, tokens, heads * d) projections."""
    b, n, width = q.shape

    def split(t: torch.Tensor) -> torch.Tensor:  # (b, n, heads * d) -> (b, heads, n, d)
        return t.reshape(b, t.shape[1], heads, width // heads).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v), is_causal=causal)
    return out.transpose(1, 2).reshape(b, n, width)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """LDM's sinusoidal embedding: [cos, sin] of t times geometrically spaced frequencies."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def resblock(L: Layers, p: str, x: torch.Tensor, emb: torch.Tensor, groups: int) -> torch.Tensor:
    h = L.conv(f"{p}.in_layers.2", F.silu(L.group_norm(f"{p}.in_layers.0", x, groups)))
    h = h + L.linear(f"{p}.emb_layers.1", F.silu(emb))[:, :, None, None]
    # A ResBlock has a 1x1 skip convolution exactly when it changes the channel count (the spec's rule too).
    skip = L.conv(f"{p}.skip_connection", x, partial=True) if x.shape[1] != h.shape[1] else x
    return L.conv(f"{p}.out_layers.3", F.silu(L.group_norm(f"{p}.out_layers.0", h, groups)), residual=skip)


def spatial_transformer(L: Layers, p: str, x: torch.Tensor, context: torch.Tensor, heads: int, groups: int,
                        depth: int = 1, linear: bool = False) -> torch.Tensor:
    """LDM's SpatialTransformer: GroupNorm, proj_in, `depth` transformer blocks (self-attention, cross-attention on
    `context`, GEGLU feed-forward) on one token stream, proj_out added to x. `linear`: proj_in/out are linear
    layers on the tokens (SDXL) instead of 1x1 convolutions (SD 1.x)."""
    b, ch, hh, ww = x.shape

    def tokens(t: torch.Tensor) -> torch.Tensor:
        return t.permute(0, 2, 3, 1).reshape(b, hh * ww, ch)

    h = L.group_norm(f"{p}.norm", x, groups, eps=1e-6)
    h = L.linear(f"{p}.proj_in", tokens(h)) if linear else tokens(L.conv(f"{p}.proj_in", h))
    names = ("to_q", "to_k", "to_v", "to_out.0")
    for j in range(depth):
        t = f"{p}.transformer_blocks.{j}"
        n1 = L.layer_norm(f"{t}.norm1", h)
        h = L.attention(f"{t}.attn1", n1, n1, heads, names, bias=False, residual=h)
        h = L.attention(f"{t}.attn2", L.layer_norm(f"{t}.norm2", h), context, heads, names, bias=False,
                        residual=h)
        value, gate = L.linear(f"{t}.ff.net.0.proj", L.layer_norm(f"{t}.norm3", h)).chunk(2, dim=-1)
        h = L.linear(f"{t}.ff.net.2", value * F.gelu(gate), residual=h)  # GEGLU
    if linear:
        h = L.linear(f"{p}.proj_out", h, residual=tokens(x))
        return h.reshape(b, hh, ww, ch).permute(0, 3, 1, 2)
    return L.conv(f"{p}.proj_out", h.reshape(b, hh, ww, ch).permute(0, 3, 1, 2), residual=x)


# (prefix, input, level) -> the level's spatial transformer applied to the input
Transformer = Callable[[str, torch.Tensor, int], torch.Tensor]


def unet_body(L: Layers, x: torch.Tensor, emb: torch.Tensor, channel_mult: tuple[int, ...], num_res_blocks: int,
              groups: int, attends: Callable[[int], bool], transformer: Transformer) -> torch.Tensor:
    """LDM's UNet from conv_in to conv_out, given the time embedding `emb`: ResBlocks per level (a transformer after
    each at the levels that `attends`), downsamplers, the middle block (whose transformer is the last level's), and
    the decoder concatenating the encoder's outputs."""
    P = UNET
    h = L.conv(f"{P}input_blocks.0.0", x)
    skips = [h]
    idx = 1
    for level in range(len(channel_mult)):
        for _ in range(num_res_blocks):
            p = f"{P}input_blocks.{idx}"
            h = resblock(L, f"{p}.0", h, emb, groups)
            if attends(level):
                h = transformer(f"{p}.1", h, level)
            skips.append(h)
            idx += 1
        if level != len(channel_mult) - 1:
            h = L.conv(f"{P}input_blocks.{idx}.0.op", h, stride=2)
            skips.append(h)
            idx += 1
    h = resblock(L, f"{P}middle_block.0", h, emb, groups)
    h = transformer(f"{P}middle_block.1", h, len(channel_mult) - 1)
    h = resblock(L, f"{P}middle_block.2", h, emb, groups)
    idx = 0
    for level in reversed(range(len(channel_mult))):
        for i in range(num_res_blocks + 1):
            p = f"{P}output_blocks.{idx}"
            h = resblock(L, f"{p}.0", torch.cat([h, skips.pop()], dim=1), emb, groups)
            sub = 1
            if attends(level):
                h = transformer(f"{p}.1", h, level)
                sub = 2
            if level and i == num_res_blocks:
                h = L.conv(f"{p}.{sub}.conv", F.interpolate(h, scale_factor=2.0, mode="nearest"))
            idx += 1
    return L.conv(f"{P}out.2", F.silu(L.group_norm(f"{P}out.0", h, groups)))
