"""The SD 1.x architecture as data: every tensor's shape, and every legal permutation group.

One walk over the network (`build_spec`) mirrors the forward pass of the LDM UNet, the CLIP-L text encoder and the
VAE. As it goes it tracks the *channel layout* of each activation: a list of segments, each owned by a permutation
group. A layer that reads an activation gets that layout on its input axis; a layer that writes a new activation
creates a new group for its output axis; identity skips and residual adds keep the group; a concatenation
joins two layouts. Because the same walk also emits every key and shape, the spec cannot disagree with the
checkpoint layout it describes.

Function preservation rules encoded here:
- residual streams are one group from their producer through every identity skip / transformer add, down to every
  consumer, including slices of the decoder's skip concatenations;
- GroupNorm(32) only tolerates permutations that map normalisation groups onto normalisation groups. Each group
  records the partitions its channels see (`Group.partitions`); `Group.structure` turns them into either a
  hierarchy of reorderable blocks or, where partitions straddle (the four UNet concatenations), fixed intervals
  (inside which the group's own GroupNorm blocks still move when the cuts fall on their boundaries);
- attention: one group per attention whose units are [q/k channels of every head | v/o channels of every head].
  Whole heads may reorder if q, k, v and the out-projection take the same head order; inside a head, q/k rows take
  one permutation (the same on q and k) and v rows / out-projection columns another. Channels never cross heads;
- a GroupNorm whose groups are one channel wide normalises each channel on its own: it constrains nothing and
  records no partition;
- GEGLU: the value and gate halves of `ff.net.0.proj` share one permutation;
- fixed: latent channels, RGB, the sinusoidal timestep input, token ids and the 77 positions.
  The text encoder's residual stream feeds every UNet `attn2.to_k/to_v` input, so it is one group across both.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import NamedTuple

from .config import SD1Config

UNET = "model.diffusion_model."
TE = "cond_stage_model.transformer.text_model."
VAE = "first_stage_model."
# The parts of a model a merge can take, in checkpoint order, and their names in a sentence (capitalise the first
# letter to start a label with one).
PARTS = ("unet", "te", "vae")
PART_NAMES = {"unet": "UNet", "te": "text encoder", "vae": "VAE"}

SCHEDULE_BUFFERS = (
    "alphas_cumprod", "alphas_cumprod_prev", "betas", "log_one_minus_alphas_cumprod",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2", "posterior_variance",
    "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
)


@dataclass(frozen=True)
class Slot:
    """A group acts on `key` along `axis`: the key's window [offset, offset + length) carries the group's units
    [start, start + length) (the whole group, except for attention groups, whose q/k and v/o halves are read by
    different tensors)."""

    key: str
    axis: int
    offset: int
    start: int
    length: int


class Segment(NamedTuple):
    """A piece of a channel layout: `length` channels carrying units [start, start + length) of `group`, or a
    fixed piece (`group` None)."""

    group: str | None
    length: int
    start: int = 0


@dataclass
class Group:
    """A set of channels that must be permuted together to keep the network's function."""

    name: str
    size: int
    part: str
    kind: str
    slots: list[Slot] = field(default_factory=list)
    # Each GroupNorm that normalises these channels cuts them into blocks; stored as sorted interior cut points.
    partitions: set[tuple[int, ...]] = field(default_factory=set)
    # Attention groups: the channels per head (the group is [q/k of every head | v/o of every head]); else 0.
    head_dim: int = 0

    @cached_property
    def structure(self) -> Structure:
        if self.head_dim:
            assert not self.partitions, self.name  # q/k/v outputs are never normalised by a GroupNorm
            return Structure(self.size, shared_blocks=self.head_dim)
        return Structure.from_partitions(self.size, self.partitions)


@dataclass(frozen=True)
class Structure:
    """Which permutations of a group are legal.

    - `levels` (hierarchical): e.g. (10, 20) means channels move freely inside blocks of 10, blocks of 10 move
      inside blocks of 20, and blocks of 20 move anywhere. Empty means any permutation is legal.
    - `intervals` (fixed): nothing crosses an interval boundary; inside each interval, `levels` apply. Used when
      GroupNorm partitions straddle each other (the four UNet concatenations), so that their blocks cannot move
      as wholes; every interval is a union of the largest level's blocks.
    - `shared_blocks` (attention heads, b channels per head): the group is two halves (q/k | v/o) cut into blocks
      of b; both halves take the same block (head) permutation, and each block is free inside.
    """

    size: int
    levels: tuple[int, ...] = ()
    intervals: tuple[tuple[int, int], ...] = ()
    shared_blocks: int = 0

    @staticmethod
    def from_partitions(size: int, partitions: Iterable[tuple[int, ...]]) -> Structure:
        parts = [tuple(p) for p in partitions if p]
        uniform = {p[0] for p in parts if size % p[0] == 0 and p == tuple(range(p[0], size, p[0]))}
        levels = sorted(uniform)
        # Uniform partitions nest into levels as long as each block size divides the next.
        for i in range(1, len(levels)):
            if levels[i] % levels[i - 1]:
                levels = levels[:i]
                break
        cuts = {c for p in parts if p[0] not in levels or p != tuple(range(p[0], size, p[0])) for c in p}
        # A level whose blocks straddle an interval boundary cannot move its blocks: demote it to cuts.
        while levels and any(c % levels[-1] for c in cuts):
            cuts |= set(range(levels[-1], size, levels[-1]))
            levels.pop()
        if not cuts:
            return Structure(size, levels=tuple(levels))
        bounds = sorted(cuts | {0, size})
        return Structure(size, levels=tuple(levels), intervals=tuple(itertools.pairwise(bounds)))


@dataclass
class ArchSpec:
    """Everything the merge needs to know about one SD 1.x architecture."""

    config: SD1Config
    shapes: dict[str, tuple[int, ...]]
    part_of_key: dict[str, str]
    groups: dict[str, Group]
    # key -> axis -> the channel layout of that axis (its segments).
    axes: dict[str, dict[int, list[Segment]]]

    def groups_in(self, parts: Iterable[str]) -> list[Group]:
        """The groups with a slot in any of `parts`: those whose permutation changes a merged key.

        `te.residual` is among them for the UNet alone: its slots include the columns of every UNet `attn2.to_k/
        to_v`. With `parts=("unet",)` the output keeps A's text encoder, and B's k/v columns must read A's text
        channels, so that stream is matched (on all its slots, text-encoder weights included: they are what tells
        B's text basis from A's) and its permutation re-indexes B's UNet k/v columns; the text encoder's keys stay
        A's because only merged parts are written from the blend."""
        wanted = set(parts)
        return [g for g in self.groups.values() if {self.part_of_key[s.key] for s in g.slots} & wanted]

    def summary(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for g in self.groups.values():
            k = f"{g.part}.{g.kind}"
            out[k] = out.get(k, 0) + 1
        return out


# A channel layout: its segments, in order.
Layout = list[Segment]


class _Walker:
    def __init__(self, config: SD1Config) -> None:
        self.c = config
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.part_of_key: dict[str, str] = {}
        self.groups: dict[str, Group] = {}
        self.axes: dict[str, dict[int, Layout]] = {}
        self.part = "unet"

    # -- primitives -------------------------------------------------------------------------------------------
    def group(self, name: str, size: int, kind: str, head_dim: int = 0) -> Layout:
        assert name not in self.groups, name
        self.groups[name] = Group(name, size, self.part, kind, head_dim=head_dim)
        return [Segment(name, size)]

    def tensor(self, key: str, shape: tuple[int, ...], layouts: dict[int, Layout] | None = None) -> None:
        assert key not in self.shapes, key
        self.shapes[key] = shape
        self.part_of_key[key] = self.part
        layouts = layouts or {}
        self.axes[key] = {}
        for axis, layout in layouts.items():
            assert _width(layout) == shape[axis], (key, axis, layout, shape)
            self.axes[key][axis] = layout
            offset = 0
            for name, n, start in layout:
                if name is not None:
                    assert start + n <= self.groups[name].size, (key, name)
                    self.groups[name].slots.append(Slot(key, axis, offset, start, n))
                offset += n

    def linear(self, key: str, out: Layout, inp: Layout, bias: bool = True, kernel: tuple[int, ...] = ()) -> None:
        o, i = _width(out), _width(inp)
        self.tensor(f"{key}.weight", (o, i, *kernel), {0: out, 1: inp})
        if bias:
            self.tensor(f"{key}.bias", (o,), {0: out})

    def conv(self, key: str, out: Layout, inp: Layout, k: int = 3) -> None:
        self.linear(key, out, inp, kernel=(k, k))

    def norm(self, key: str, x: Layout, groups: int | None = None) -> None:
        """LayerNorm (groups=None) or GroupNorm over layout x; GroupNorm records its partition on each group."""
        self.tensor(f"{key}.weight", (_width(x),), {0: x})
        self.tensor(f"{key}.bias", (_width(x),), {0: x})
        if groups is None:
            return
        width = _width(x)
        assert width % groups == 0, (key, width)
        block = width // groups
        if block == 1:
            return  # each channel is normalised on its own: every permutation commutes with this GroupNorm
        offset = 0
        for name, n, start in x:
            if name is not None:
                assert start == 0 and n == self.groups[name].size, (key, name)  # no GroupNorm sees a window
                cuts = tuple(c - offset for c in range(block, width, block) if offset < c < offset + n)
                self.groups[name].partitions.add(cuts)
            offset += n

    def fixed(self, n: int) -> Layout:
        return [Segment(None, n)]

    # -- UNet -------------------------------------------------------------------------------------------------
    def resblock(self, p: str, x: Layout, cout: int, name: str, emb: Layout) -> Layout:
        g = self.c.gn_groups
        self.norm(f"{p}.in_layers.0", x, g)
        inner = self.group(f"{name}.inner", cout, "resblock_inner")
        self.conv(f"{p}.in_layers.2", inner, x)
        self.linear(f"{p}.emb_layers.1", inner, emb)
        self.norm(f"{p}.out_layers.0", inner, g)
        if _width(x) == cout and len(x) == 1:
            out = x  # identity skip: the output is the same residual stream
        else:
            out = self.group(f"{name}.out", cout, "residual")
            self.conv(f"{p}.skip_connection", out, x, k=1)
        self.conv(f"{p}.out_layers.3", out, inner)
        return out

    def attention(self, p: str, name: str, x: Layout, context: Layout, heads: int, bias_qkv: bool,
                  out_bias: bool = True, qkv_names: tuple[str, str, str, str] = ("to_q", "to_k", "to_v", "to_out.0"),
                  kernel: tuple[int, ...] = ()) -> None:
        width = _width(x)
        # One group [q/k of every head | v/o of every head]: the two windows share the head order (spec docstring).
        self.group(f"{name}.heads", 2 * width, "attention", head_dim=width // heads)
        qk = [Segment(f"{name}.heads", width, 0)]
        vo = [Segment(f"{name}.heads", width, width)]
        q, k, v, o = qkv_names
        self.linear(f"{p}.{q}", qk, x, bias=bias_qkv, kernel=kernel)
        self.linear(f"{p}.{k}", qk, context, bias=bias_qkv, kernel=kernel)
        self.linear(f"{p}.{v}", vo, context, bias=bias_qkv, kernel=kernel)
        self.linear(f"{p}.{o}", x, vo, bias=out_bias, kernel=kernel)

    def spatial_transformer(self, p: str, x: Layout, name: str, context: Layout) -> None:
        c = _width(x)
        self.norm(f"{p}.norm", x, self.c.gn_groups)
        t = self.group(f"{name}.inner", c, "transformer_inner")
        self.conv(f"{p}.proj_in", t, x, k=1)
        b = f"{p}.transformer_blocks.0"
        self.norm(f"{b}.norm1", t)
        self.attention(f"{b}.attn1", f"{name}.attn1", t, t, self.c.unet_heads, bias_qkv=False)
        self.norm(f"{b}.norm2", t)
        self.attention(f"{b}.attn2", f"{name}.attn2", t, context, self.c.unet_heads, bias_qkv=False)
        self.norm(f"{b}.norm3", t)
        hidden = self.group(f"{name}.ff", 4 * c, "ff_hidden")
        self.linear(f"{b}.ff.net.0.proj", hidden + hidden, t)  # GEGLU: value and gate halves share the perm
        self.linear(f"{b}.ff.net.2", t, hidden)
        self.conv(f"{p}.proj_out", x, t, k=1)

    def unet(self, context: Layout) -> None:
        c = self.c
        self.part = "unet"
        P = UNET
        mc = c.model_channels
        temb = 4 * mc
        hid = self.group("unet.time_embed.hidden", temb, "time_hidden")
        self.linear(f"{P}time_embed.0", hid, self.fixed(mc))
        emb = self.group("unet.time_embed.emb", temb, "time_emb")
        self.linear(f"{P}time_embed.2", emb, hid)

        h = self.group("unet.input_blocks.0", mc, "residual")
        self.conv(f"{P}input_blocks.0.0", h, self.fixed(c.unet_in_channels))
        skips = [h]
        idx = 1
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                p = f"{P}input_blocks.{idx}"
                h = self.resblock(f"{p}.0", h, mult * mc, f"unet.input_blocks.{idx}", emb)
                if level in c.attention_levels:
                    self.spatial_transformer(f"{p}.1", h, f"unet.input_blocks.{idx}.transformer", context)
                skips.append(h)
                idx += 1
            if level != len(c.channel_mult) - 1:
                out = self.group(f"unet.input_blocks.{idx}", _width(h), "residual")
                self.conv(f"{P}input_blocks.{idx}.0.op", out, h)
                h = out
                skips.append(h)
                idx += 1

        h = self.resblock(f"{P}middle_block.0", h, _width(h), "unet.middle_block.0", emb)
        self.spatial_transformer(f"{P}middle_block.1", h, "unet.middle_block.1.transformer", context)
        h = self.resblock(f"{P}middle_block.2", h, _width(h), "unet.middle_block.2", emb)

        idx = 0
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                p = f"{P}output_blocks.{idx}"
                x = h + skips.pop()  # torch.cat([h, skip], dim=1)
                h = self.resblock(f"{p}.0", x, mult * mc, f"unet.output_blocks.{idx}", emb)
                sub = 1
                if level in c.attention_levels:
                    self.spatial_transformer(f"{p}.1", h, f"unet.output_blocks.{idx}.transformer", context)
                    sub = 2
                if level and i == c.num_res_blocks:
                    out = self.group(f"unet.output_blocks.{idx}.upsample", _width(h), "residual")
                    self.conv(f"{p}.{sub}.conv", out, h)
                    h = out
                idx += 1
        self.norm(f"{P}out.0", h, c.gn_groups)
        self.conv(f"{P}out.2", self.fixed(c.unet_out_channels), h)

    # -- text encoder -----------------------------------------------------------------------------------------
    def text_encoder(self) -> Layout:
        c = self.c
        self.part = "te"
        P = TE
        x = self.group("te.residual", c.te_width, "residual")
        self.tensor(f"{P}embeddings.token_embedding.weight", (c.te_vocab, c.te_width), {1: x})
        self.tensor(f"{P}embeddings.position_embedding.weight", (c.te_positions, c.te_width), {1: x})
        self.tensor(f"{P}embeddings.position_ids", (1, c.te_positions))
        for i in range(c.te_layers):
            p = f"{P}encoder.layers.{i}"
            self.norm(f"{p}.layer_norm1", x)
            self.attention(f"{p}.self_attn", f"te.layers.{i}.attn", x, x, c.te_heads, bias_qkv=True,
                           qkv_names=("q_proj", "k_proj", "v_proj", "out_proj"))
            self.norm(f"{p}.layer_norm2", x)
            hidden = self.group(f"te.layers.{i}.mlp", c.te_mlp, "mlp_hidden")
            self.linear(f"{p}.mlp.fc1", hidden, x)
            self.linear(f"{p}.mlp.fc2", x, hidden)
        self.norm(f"{P}final_layer_norm", x)
        return x

    # -- VAE --------------------------------------------------------------------------------------------------
    def vae_resblock(self, p: str, x: Layout, cout: int, name: str) -> Layout:
        g = self.c.gn_groups
        self.norm(f"{p}.norm1", x, g)
        inner = self.group(f"{name}.inner", cout, "resblock_inner")
        self.conv(f"{p}.conv1", inner, x)
        self.norm(f"{p}.norm2", inner, g)
        if _width(x) == cout:
            out = x
        else:
            out = self.group(f"{name}.out", cout, "residual")
            self.conv(f"{p}.nin_shortcut", out, x, k=1)
        self.conv(f"{p}.conv2", out, inner)
        return out

    def vae_mid(self, p: str, x: Layout, name: str) -> None:
        self.vae_resblock(f"{p}.mid.block_1", x, _width(x), f"{name}.mid.block_1")
        self.norm(f"{p}.mid.attn_1.norm", x, self.c.gn_groups)
        self.attention(f"{p}.mid.attn_1", f"{name}.mid.attn_1", x, x, 1, bias_qkv=True,
                       qkv_names=("q", "k", "v", "proj_out"), kernel=(1, 1))
        self.vae_resblock(f"{p}.mid.block_2", x, _width(x), f"{name}.mid.block_2")

    def vae(self) -> None:
        c = self.c
        self.part = "vae"
        P = VAE
        ch = [c.vae_channels * m for m in c.vae_mult]
        # encoder
        h = self.group("vae.encoder.conv_in", ch[0], "residual")
        self.conv(f"{P}encoder.conv_in", h, self.fixed(3))
        for level, cout in enumerate(ch):
            for j in range(c.vae_res_blocks):
                h = self.vae_resblock(f"{P}encoder.down.{level}.block.{j}", h, cout,
                                      f"vae.encoder.down.{level}.block.{j}")
            if level != len(ch) - 1:
                out = self.group(f"vae.encoder.down.{level}.downsample", cout, "residual")
                self.conv(f"{P}encoder.down.{level}.downsample.conv", out, h)
                h = out
        self.vae_mid(f"{P}encoder", h, "vae.encoder")
        self.norm(f"{P}encoder.norm_out", h, c.gn_groups)
        self.conv(f"{P}encoder.conv_out", self.fixed(2 * c.vae_z), h)
        self.conv(f"{P}quant_conv", self.fixed(2 * c.vae_z), self.fixed(2 * c.vae_z), k=1)
        # decoder
        self.conv(f"{P}post_quant_conv", self.fixed(c.vae_z), self.fixed(c.vae_z), k=1)
        h = self.group("vae.decoder.conv_in", ch[-1], "residual")
        self.conv(f"{P}decoder.conv_in", h, self.fixed(c.vae_z))
        self.vae_mid(f"{P}decoder", h, "vae.decoder")
        for level in reversed(range(len(ch))):
            for j in range(c.vae_res_blocks + 1):
                h = self.vae_resblock(f"{P}decoder.up.{level}.block.{j}", h, ch[level],
                                      f"vae.decoder.up.{level}.block.{j}")
            if level != 0:
                out = self.group(f"vae.decoder.up.{level}.upsample", ch[level], "residual")
                self.conv(f"{P}decoder.up.{level}.upsample.conv", out, h)
                h = out
        self.norm(f"{P}decoder.norm_out", h, c.gn_groups)
        self.conv(f"{P}decoder.conv_out", self.fixed(3), h)


def _width(layout: Layout) -> int:
    return sum(seg.length for seg in layout)


def build_spec(config: SD1Config) -> ArchSpec:
    """Walk the architecture once; return its key layout and permutation groups."""
    w = _Walker(config)
    context = w.text_encoder()
    w.unet(context)
    w.vae()
    w.part = "other"
    for name in SCHEDULE_BUFFERS:
        w.tensor(name, (config.timesteps,))
    return ArchSpec(config, w.shapes, w.part_of_key, w.groups, w.axes)


def part_of(key: str) -> str:
    """Which model part a checkpoint key belongs to ('other' for buffers and unknown keys)."""
    if key.startswith(UNET):
        return "unet"
    if key.startswith("cond_stage_model."):
        return "te"
    if key.startswith(VAE):
        return "vae"
    return "other"
