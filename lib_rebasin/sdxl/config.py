"""The SDXL hyper-parameters (`SDXLConfig`: full size and a reduced test scale), and recognising an SDXL checkpoint
from its keys and shapes.

Every width, depth and layer count is read off the file's own tensor shapes, so any model with SDXL's structure is
recognised, reduced-width test models included: channels divisible by GroupNorm's 32 groups, attention heads of 64
channels, and a cross-attention context as wide as the CLIP-L width plus the CLIP-G width. Nothing is looked up in
a table of known sizes; `SDXL_BASE` only gives the defaults the synthetic generator starts from.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from ..errors import UnsupportedModelError
from ..parts import UNET, VAE

CLIP_L = "conditioner.embedders.0.transformer.text_model."
CLIP_G = "conditioner.embedders.1.model."


@dataclass(frozen=True)
class SDXLConfig:
    """Hyper-parameters of an SDXL checkpoint in the single-file (SGM) layout (defaults: SDXL base 1.0)."""

    unet_in_channels: int = 4
    unet_out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 2
    transformer_depth: tuple[int, ...] = (0, 2, 10)   # transformer blocks per attention, per level
    head_channels: int = 64
    gn_groups: int = 32
    adm_channels: int = 2816                          # label_emb input: pooled CLIP-G + 6 size/crop features
    clip_l_width: int = 768
    clip_l_layers: int = 12
    clip_l_mlp: int = 3072
    clip_l_vocab: int = 49408
    clip_g_width: int = 1280
    clip_g_layers: int = 32
    clip_g_mlp: int = 5120
    clip_g_vocab: int = 49408
    clip_g_projection: int = 1280
    text_positions: int = 77
    vae_channels: int = 128
    vae_mult: tuple[int, ...] = (1, 2, 4, 4)
    vae_res_blocks: int = 2
    vae_z: int = 4
    timesteps: int = 1000

    @property
    def context_dim(self) -> int:
        """The UNet's cross-attention input: CLIP-L's hidden states next to CLIP-G's."""
        return self.clip_l_width + self.clip_g_width

    def heads(self, width: int) -> int:
        return width // self.head_channels

    @property
    def variant(self) -> str:
        return {4: "SDXL", 9: "SDXL inpainting"}.get(self.unet_in_channels,
                                                      f"SDXL ({self.unet_in_channels}-channel UNet)")

    @property
    def is_full_size(self) -> bool:
        return (self.model_channels, self.clip_l_width, self.clip_g_width, self.vae_channels) == (320, 768, 1280, 128)

    def describe(self) -> str:
        size = "" if self.is_full_size else (
            f" (reduced width: UNet {self.model_channels}, text encoders {self.clip_l_width} + "
            f"{self.clip_g_width}, VAE {self.vae_channels})")
        return self.variant + size


SDXL_BASE = SDXLConfig()

# A small model with SDXL's topology: three levels, no attention at the first, a different transformer depth at each
# attention level (two blocks sharing one stream at the last level and the middle), 64-channel heads (two or four
# per attention), every GroupNorm with 32 groups of two or more channels, and decoder concatenations that straddle
# GroupNorm groups as at full size; both text encoders with two or three heads. The ADM input keeps SDXL's 6 x 256
# size/crop features next to a reduced pooled projection.
MINI = replace(SDXL_BASE, model_channels=64, transformer_depth=(0, 1, 2), adm_channels=128 + 1536,
               clip_l_width=128, clip_l_layers=3, clip_l_mlp=512, clip_l_vocab=1000,
               clip_g_width=192, clip_g_layers=4, clip_g_mlp=768, clip_g_vocab=1000, clip_g_projection=128,
               vae_channels=64)


def is_sdxl(shapes: Mapping[str, Sequence[int]]) -> bool:
    """Whether a checkpoint's keys are SDXL's (base or inpainting: the UNet's ADM embedding and the two text
    encoders under `conditioner.embedders`)."""
    return f"{UNET}label_emb.0.0.weight" in shapes and any(k.startswith("conditioner.embedders.") for k in shapes)


def _count(shapes: Mapping[str, Sequence[int]], pattern: str) -> int:
    n = 0
    while pattern.format(n) in shapes:
        n += 1
    return n


def detect(shapes: Mapping[str, Sequence[int]]) -> SDXLConfig:
    """Return the SDXL config of a checkpoint given {key: shape}, or raise UnsupportedModelError."""
    if not is_sdxl(shapes):
        raise UnsupportedModelError("Not an SDXL checkpoint (no 'label_emb' and 'conditioner.embedders' keys).")
    if any(k.startswith("conditioner.embedders.0.model.") for k in shapes):
        raise UnsupportedModelError("This is an SDXL refiner (OpenCLIP text encoder only); it is not supported.")

    def shape(key: str) -> Sequence[int]:
        if key not in shapes:
            raise UnsupportedModelError(f"Unrecognised SDXL layout: '{key}' is missing.")
        return shapes[key]

    conv_in = shape(f"{UNET}input_blocks.0.0.weight")
    mc = int(conv_in[0])
    # The encoder's blocks in order: ResBlocks (with their output width) and downsamplers close each level.
    widths: list[list[int]] = [[]]
    depths: list[list[int]] = [[]]
    idx = 1
    while True:
        p = f"{UNET}input_blocks.{idx}.0"
        if f"{p}.op.weight" in shapes:
            widths.append([])
            depths.append([])
        elif f"{p}.in_layers.2.weight" in shapes:
            widths[-1].append(int(shapes[f"{p}.in_layers.2.weight"][0]))
            depths[-1].append(_count(shapes, f"{UNET}input_blocks.{idx}.1.transformer_blocks.{{}}.attn1.to_q.weight"))
        else:
            break
        idx += 1
    res_blocks = len(widths[0])
    if not res_blocks or any(len(w) != res_blocks or len(set(w)) != 1 or len(set(d)) != 1
                             for w, d in zip(widths, depths, strict=True)) or any(w[0] % mc for w in widths):
        raise UnsupportedModelError(f"Unrecognised SDXL UNet layout (ResBlock widths per level {widths}, "
                                    f"transformer depths {depths}).")
    l_tok = shape(f"{CLIP_L}embeddings.token_embedding.weight")
    g_tok = shape(f"{CLIP_G}token_embedding.weight")
    g_proj = shapes.get(f"{CLIP_G}text_projection")
    config = SDXLConfig(
        unet_in_channels=int(conv_in[1]),
        unet_out_channels=int(shape(f"{UNET}out.2.weight")[0]),
        model_channels=mc,
        channel_mult=tuple(w[0] // mc for w in widths),
        num_res_blocks=res_blocks,
        transformer_depth=tuple(d[0] for d in depths),
        adm_channels=int(shape(f"{UNET}label_emb.0.0.weight")[1]),
        clip_l_width=int(l_tok[1]),
        clip_l_layers=_count(shapes, f"{CLIP_L}encoder.layers.{{}}.mlp.fc1.weight"),
        clip_l_mlp=int(shape(f"{CLIP_L}encoder.layers.0.mlp.fc1.weight")[0]),
        clip_l_vocab=int(l_tok[0]),
        clip_g_width=int(g_tok[1]),
        clip_g_layers=_count(shapes, f"{CLIP_G}transformer.resblocks.{{}}.mlp.c_fc.weight"),
        clip_g_mlp=int(shape(f"{CLIP_G}transformer.resblocks.0.mlp.c_fc.weight")[0]),
        clip_g_vocab=int(g_tok[0]),
        # Without its (optional) text_projection the pooled width cannot be read; OpenCLIP's is square.
        clip_g_projection=int(g_proj[1]) if g_proj is not None else int(g_tok[1]),
        text_positions=int(shape(f"{CLIP_G}positional_embedding")[0]),
    )
    config = _with_vae(config, shapes)
    _check_widths(config, shapes)
    return config


def _with_vae(config: SDXLConfig, shapes: Mapping[str, Sequence[int]]) -> SDXLConfig:
    """The VAE's widths from its encoder (a file without a VAE keeps the defaults: there is nothing to merge)."""
    conv_in = shapes.get(f"{VAE}encoder.conv_in.weight")
    if conv_in is None:
        return config
    ch = int(conv_in[0])
    levels = _count(shapes, f"{VAE}encoder.down.{{}}.block.0.conv1.weight")
    mult = tuple(int(shapes[f"{VAE}encoder.down.{i}.block.0.conv1.weight"][0]) // ch for i in range(levels))
    z = shapes.get(f"{VAE}decoder.conv_in.weight")
    return replace(config, vae_channels=ch, vae_mult=mult,
                   vae_res_blocks=_count(shapes, f"{VAE}encoder.down.0.block.{{}}.conv1.weight"),
                   vae_z=int(z[1]) if z is not None else config.vae_z)


def _check_widths(c: SDXLConfig, shapes: Mapping[str, Sequence[int]]) -> None:
    attn = [lv for lv, d in enumerate(c.transformer_depth) if d]
    if not attn:
        raise UnsupportedModelError("Unrecognised SDXL UNet layout: no cross-attention found.")
    idx = 1 + attn[0] * (c.num_res_blocks + 1)
    context = int(shapes[f"{UNET}input_blocks.{idx}.1.transformer_blocks.0.attn2.to_k.weight"][1])
    if context != c.context_dim:
        raise UnsupportedModelError(f"The UNet's context width {context} is not CLIP-L's {c.clip_l_width} plus "
                                    f"CLIP-G's {c.clip_g_width}; this is not an SDXL checkpoint.")
    odd = [w for w in (c.model_channels * m for m in c.channel_mult) if w % c.gn_groups]
    odd += [w for w in (c.clip_l_width, c.clip_g_width, *(c.model_channels * c.channel_mult[lv] for lv in attn))
            if w % c.head_channels]
    if odd or c.vae_channels % c.gn_groups:
        raise UnsupportedModelError(f"Unrecognised SDXL widths ({', '.join(map(str, odd or [c.vae_channels]))} "
                                    f"cannot hold GroupNorm({c.gn_groups}) groups or {c.head_channels}-channel "
                                    "heads).")
    if not c.clip_l_layers or not c.clip_g_layers:
        raise UnsupportedModelError("An SDXL text encoder has no layers.")


def check_layout(config: SDXLConfig, shapes: Mapping[str, Sequence[int]], has_vae: bool = True) -> None:
    """Raise UnsupportedModelError unless every key of the config's layout is present with the right shape
    (the keys community files often leave out are optional)."""
    from ..parts import part_of
    from .spec import OPTIONAL, build_spec

    expected = build_spec(config).shapes
    missing = [k for k in expected if k not in shapes and k not in OPTIONAL
               and not (part_of(k) == "vae" and not has_vae) and part_of(k) != "other"]
    if missing:
        raise UnsupportedModelError(f"{config.variant} layout expected, but {len(missing)} keys are missing "
                                    f"(e.g. {', '.join(sorted(missing)[:2])}).")
    wrong = [k for k in expected if k in shapes and tuple(shapes[k]) != expected[k] and k not in OPTIONAL]
    if wrong:
        k = wrong[0]
        raise UnsupportedModelError(f"{config.variant} layout expected, but {len(wrong)} tensors have unexpected "
                                    f"shapes (e.g. {k}: {tuple(shapes[k])}, expected {expected[k]}).")
