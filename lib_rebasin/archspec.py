"""Architecture-independent parts of a permutation spec: its data types, and the walker's building blocks.

An architecture package (`sd1/`, `sdxl/`) walks its network once with a `SpecWalker`, which emits every key, its
shape and the permutation groups on each axis (the rules the walk encodes are listed in `sd1/spec.py`). The types
and the blocks two architectures share (ResBlocks, attention, the CLIP text encoder in both key layouts, the VAE)
live here, so the merge code reads one `ArchSpec` whatever the architecture.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Generic, NamedTuple, TypeVar

ConfigT = TypeVar("ConfigT")


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
class ArchSpec(Generic[ConfigT]):
    """Everything the merge needs to know about one architecture (its config type is the parameter)."""

    config: ConfigT
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


class SpecWalker:
    """Emits keys, shapes and groups; a subclass walks one architecture with these blocks."""

    def __init__(self, gn_groups: int) -> None:
        self.gn_groups = gn_groups
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
            assert layout_width(layout) == shape[axis], (key, axis, layout, shape)
            self.axes[key][axis] = layout
            offset = 0
            for name, n, start in layout:
                if name is not None:
                    assert start + n <= self.groups[name].size, (key, name)
                    self.groups[name].slots.append(Slot(key, axis, offset, start, n))
                offset += n

    def linear(self, key: str, out: Layout, inp: Layout, bias: bool = True, kernel: tuple[int, ...] = ()) -> None:
        o, i = layout_width(out), layout_width(inp)
        self.tensor(f"{key}.weight", (o, i, *kernel), {0: out, 1: inp})
        if bias:
            self.tensor(f"{key}.bias", (o,), {0: out})

    def conv(self, key: str, out: Layout, inp: Layout, k: int = 3) -> None:
        self.linear(key, out, inp, kernel=(k, k))

    def norm(self, key: str, x: Layout, groups: int | None = None) -> None:
        """LayerNorm (groups=None) or GroupNorm over layout x; GroupNorm records its partition on each group."""
        self.tensor(f"{key}.weight", (layout_width(x),), {0: x})
        self.tensor(f"{key}.bias", (layout_width(x),), {0: x})
        if groups is None:
            return
        width = layout_width(x)
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

    # -- blocks shared by the architectures -------------------------------------------------------------------
    def resblock(self, p: str, x: Layout, cout: int, name: str, emb: Layout) -> Layout:
        g = self.gn_groups
        self.norm(f"{p}.in_layers.0", x, g)
        inner = self.group(f"{name}.inner", cout, "resblock_inner")
        self.conv(f"{p}.in_layers.2", inner, x)
        self.linear(f"{p}.emb_layers.1", inner, emb)
        self.norm(f"{p}.out_layers.0", inner, g)
        if layout_width(x) == cout and len(x) == 1:
            out = x  # identity skip: the output is the same residual stream
        else:
            out = self.group(f"{name}.out", cout, "residual")
            self.conv(f"{p}.skip_connection", out, x, k=1)
        self.conv(f"{p}.out_layers.3", out, inner)
        return out

    def unet_body(self, P: str, mc: int, channel_mult: tuple[int, ...], num_res_blocks: int, in_channels: int,
                  out_channels: int, emb: Layout, attends: Callable[[int], bool],
                  transformer: Callable[[str, Layout, str, int], None]) -> None:
        """LDM's UNet from conv_in to conv_out, given the time embedding's `emb` stream: ResBlocks per level (a
        transformer, `transformer(prefix, stream, name, level)`, after each at the levels that `attends`),
        downsamplers, the middle block (its transformer is the last level's) and the decoder, whose concatenations
        join the encoder's streams."""
        h = self.group("unet.input_blocks.0", mc, "residual")
        self.conv(f"{P}input_blocks.0.0", h, self.fixed(in_channels))
        skips = [h]
        idx = 1
        last = len(channel_mult) - 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                p = f"{P}input_blocks.{idx}"
                h = self.resblock(f"{p}.0", h, mult * mc, f"unet.input_blocks.{idx}", emb)
                if attends(level):
                    transformer(f"{p}.1", h, f"unet.input_blocks.{idx}.transformer", level)
                skips.append(h)
                idx += 1
            if level != last:
                out = self.group(f"unet.input_blocks.{idx}", layout_width(h), "residual")
                self.conv(f"{P}input_blocks.{idx}.0.op", out, h)
                h = out
                skips.append(h)
                idx += 1

        h = self.resblock(f"{P}middle_block.0", h, layout_width(h), "unet.middle_block.0", emb)
        transformer(f"{P}middle_block.1", h, "unet.middle_block.1.transformer", last)
        h = self.resblock(f"{P}middle_block.2", h, layout_width(h), "unet.middle_block.2", emb)

        idx = 0
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                p = f"{P}output_blocks.{idx}"
                x = h + skips.pop()  # torch.cat([h, skip], dim=1)
                h = self.resblock(f"{p}.0", x, mult * mc, f"unet.output_blocks.{idx}", emb)
                sub = 1
                if attends(level):
                    transformer(f"{p}.1", h, f"unet.output_blocks.{idx}.transformer", level)
                    sub = 2
                if level and i == num_res_blocks:
                    out = self.group(f"unet.output_blocks.{idx}.upsample", layout_width(h), "residual")
                    self.conv(f"{p}.{sub}.conv", out, h)
                    h = out
                idx += 1
        self.norm(f"{P}out.0", h, self.gn_groups)
        self.conv(f"{P}out.2", self.fixed(out_channels), h)

    def attention(self, p: str, name: str, x: Layout, context: Layout, heads: int, bias_qkv: bool,
                  out_bias: bool = True, qkv_names: tuple[str, str, str, str] = ("to_q", "to_k", "to_v", "to_out.0"),
                  kernel: tuple[int, ...] = ()) -> None:
        width = layout_width(x)
        # One group [q/k of every head | v/o of every head]: the two windows share the head order (spec docstring).
        self.group(f"{name}.heads", 2 * width, "attention", head_dim=width // heads)
        qk = [Segment(f"{name}.heads", width, 0)]
        vo = [Segment(f"{name}.heads", width, width)]
        q, k, v, o = qkv_names
        self.linear(f"{p}.{q}", qk, x, bias=bias_qkv, kernel=kernel)
        self.linear(f"{p}.{k}", qk, context, bias=bias_qkv, kernel=kernel)
        self.linear(f"{p}.{v}", vo, context, bias=bias_qkv, kernel=kernel)
        self.linear(f"{p}.{o}", x, vo, bias=out_bias, kernel=kernel)

    # -- text encoders
    def clip_text(self, prefix: str, name: str, width: int, layers: int, heads: int, mlp: int, vocab: int,
                  positions: int) -> Layout:
        """The CLIP text encoder in transformers' key layout (`embeddings.*`, `encoder.layers.N.*`)."""
        x = self.group(f"{name}.residual", width, "residual")
        self.tensor(f"{prefix}embeddings.token_embedding.weight", (vocab, width), {1: x})
        self.tensor(f"{prefix}embeddings.position_embedding.weight", (positions, width), {1: x})
        self.tensor(f"{prefix}embeddings.position_ids", (1, positions))
        for i in range(layers):
            p = f"{prefix}encoder.layers.{i}"
            self.norm(f"{p}.layer_norm1", x)
            self.attention(f"{p}.self_attn", f"{name}.layers.{i}.attn", x, x, heads, bias_qkv=True,
                           qkv_names=("q_proj", "k_proj", "v_proj", "out_proj"))
            self.norm(f"{p}.layer_norm2", x)
            hidden = self.group(f"{name}.layers.{i}.mlp", mlp, "mlp_hidden")
            self.linear(f"{p}.mlp.fc1", hidden, x)
            self.linear(f"{p}.mlp.fc2", x, hidden)
        self.norm(f"{prefix}final_layer_norm", x)
        return x

    def open_clip_text(self, prefix: str, name: str, width: int, layers: int, heads: int, mlp: int, vocab: int,
                       positions: int, projection: int) -> Layout:
        """The CLIP text encoder in OpenCLIP's key layout: q, k and v fused in one `in_proj` (rows q | k | v, so
        the attention group's q/k window appears twice on its output axis), and `text_projection` stored as
        [width, projection] (the residual stream on axis 0; the projection space is fixed)."""
        x = self.group(f"{name}.residual", width, "residual")
        self.tensor(f"{prefix}token_embedding.weight", (vocab, width), {1: x})
        self.tensor(f"{prefix}positional_embedding", (positions, width), {1: x})
        for i in range(layers):
            p = f"{prefix}transformer.resblocks.{i}"
            self.norm(f"{p}.ln_1", x)
            heads_group = f"{name}.layers.{i}.attn.heads"
            self.group(heads_group, 2 * width, "attention", head_dim=width // heads)
            qk = [Segment(heads_group, width, 0)]
            vo = [Segment(heads_group, width, width)]
            self.tensor(f"{p}.attn.in_proj_weight", (3 * width, width), {0: qk + qk + vo, 1: x})
            self.tensor(f"{p}.attn.in_proj_bias", (3 * width,), {0: qk + qk + vo})
            self.linear(f"{p}.attn.out_proj", x, vo)
            self.norm(f"{p}.ln_2", x)
            hidden = self.group(f"{name}.layers.{i}.mlp", mlp, "mlp_hidden")
            self.linear(f"{p}.mlp.c_fc", hidden, x)
            self.linear(f"{p}.mlp.c_proj", x, hidden)
        self.norm(f"{prefix}ln_final", x)
        self.tensor(f"{prefix}text_projection", (width, projection), {0: x})
        self.tensor(f"{prefix}logit_scale", ())
        return x

    # -- VAE --------------------------------------------------------------------------------------------------
    def vae_resblock(self, p: str, x: Layout, cout: int, name: str) -> Layout:
        g = self.gn_groups
        self.norm(f"{p}.norm1", x, g)
        inner = self.group(f"{name}.inner", cout, "resblock_inner")
        self.conv(f"{p}.conv1", inner, x)
        self.norm(f"{p}.norm2", inner, g)
        if layout_width(x) == cout:
            out = x
        else:
            out = self.group(f"{name}.out", cout, "residual")
            self.conv(f"{p}.nin_shortcut", out, x, k=1)
        self.conv(f"{p}.conv2", out, inner)
        return out

    def vae_mid(self, p: str, x: Layout, name: str) -> None:
        self.vae_resblock(f"{p}.mid.block_1", x, layout_width(x), f"{name}.mid.block_1")
        self.norm(f"{p}.mid.attn_1.norm", x, self.gn_groups)
        self.attention(f"{p}.mid.attn_1", f"{name}.mid.attn_1", x, x, 1, bias_qkv=True,
                       qkv_names=("q", "k", "v", "proj_out"), kernel=(1, 1))
        self.vae_resblock(f"{p}.mid.block_2", x, layout_width(x), f"{name}.mid.block_2")

    def vae(self, prefix: str, channels: int, mult: tuple[int, ...], res_blocks: int, z: int) -> None:
        """The KL autoencoder (`encoder.*`, `decoder.*`, the quant convs) under `prefix`."""
        self.part = "vae"
        ch = [channels * m for m in mult]
        # encoder
        h = self.group("vae.encoder.conv_in", ch[0], "residual")
        self.conv(f"{prefix}encoder.conv_in", h, self.fixed(3))
        for level, cout in enumerate(ch):
            for j in range(res_blocks):
                h = self.vae_resblock(f"{prefix}encoder.down.{level}.block.{j}", h, cout,
                                      f"vae.encoder.down.{level}.block.{j}")
            if level != len(ch) - 1:
                out = self.group(f"vae.encoder.down.{level}.downsample", cout, "residual")
                self.conv(f"{prefix}encoder.down.{level}.downsample.conv", out, h)
                h = out
        self.vae_mid(f"{prefix}encoder", h, "vae.encoder")
        self.norm(f"{prefix}encoder.norm_out", h, self.gn_groups)
        self.conv(f"{prefix}encoder.conv_out", self.fixed(2 * z), h)
        self.conv(f"{prefix}quant_conv", self.fixed(2 * z), self.fixed(2 * z), k=1)
        # decoder
        self.conv(f"{prefix}post_quant_conv", self.fixed(z), self.fixed(z), k=1)
        h = self.group("vae.decoder.conv_in", ch[-1], "residual")
        self.conv(f"{prefix}decoder.conv_in", h, self.fixed(z))
        self.vae_mid(f"{prefix}decoder", h, "vae.decoder")
        for level in reversed(range(len(ch))):
            for j in range(res_blocks + 1):
                h = self.vae_resblock(f"{prefix}decoder.up.{level}.block.{j}", h, ch[level],
                                      f"vae.decoder.up.{level}.block.{j}")
            if level != 0:
                out = self.group(f"vae.decoder.up.{level}.upsample", ch[level], "residual")
                self.conv(f"{prefix}decoder.up.{level}.upsample.conv", out, h)
                h = out
        self.norm(f"{prefix}decoder.norm_out", h, self.gn_groups)
        self.conv(f"{prefix}decoder.conv_out", self.fixed(3), h)


    def spec(self, config: ConfigT) -> ArchSpec[ConfigT]:
        return ArchSpec(config, self.shapes, self.part_of_key, self.groups, self.axes)


def layout_width(layout: Layout) -> int:
    return sum(seg.length for seg in layout)
