"""The SD 1.x hyper-parameters (`SD1Config`: full size and the reduced test scales), and recognising a checkpoint
from its keys and shapes.

Only the SD 1.x family is supported (plain, 9-channel inpainting, 8-channel instruct-pix2pix). Its hyper-parameters
are read off the tensor shapes, so reduced-width copies with the same key layout (the project's synthetic test
models) are recognised too. Everything else is refused with a message that names what was found.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from ..errors import UnsupportedModelError


@dataclass(frozen=True)
class SD1Config:
    """Hyper-parameters of an SD 1.x checkpoint (defaults: SD 1.5)."""

    unet_in_channels: int = 4
    unet_out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = (0, 1, 2)
    unet_heads: int = 8
    gn_groups: int = 32
    te_width: int = 768
    te_layers: int = 12
    te_heads: int = 12
    te_mlp: int = 3072
    te_vocab: int = 49408
    te_positions: int = 77
    vae_channels: int = 128
    vae_mult: tuple[int, ...] = (1, 2, 4, 4)
    vae_res_blocks: int = 2
    vae_z: int = 4
    timesteps: int = 1000

    @property
    def variant(self) -> str:
        return {4: "SD 1.x", 9: "SD 1.x inpainting", 8: "SD 1.x instruct-pix2pix"}.get(
            self.unet_in_channels, f"SD 1.x ({self.unet_in_channels}-channel UNet)")

    @property
    def is_full_size(self) -> bool:
        return self.model_channels == 320 and self.te_width == 768 and self.vae_channels == 128

    def describe(self) -> str:
        size = "" if self.is_full_size else (
            f" (reduced width: UNet {self.model_channels}, text encoder {self.te_width}, VAE {self.vae_channels})")
        return self.variant + size


SD15 = SD1Config()

# A small model with the exact SD 1.5 key layout; every GroupNorm still has 32 groups of >= 2 channels and the
# decoder concatenations still straddle group boundaries, so it exercises every rule of the full-size spec.
MINI = replace(SD15, model_channels=64, te_width=96, te_mlp=384, te_vocab=1000, vae_channels=64)

# The smallest model with the exact SD 1.5 key layout, for tests of files, the UI, the API and recipes, where the
# spec is not what is under test: widths at the detector's minimum (one channel per GroupNorm group at the first
# level), and channel multipliers that still change at the same levels as SD 1.5's, so the same shortcut convs exist.
TINY = replace(MINI, model_channels=32, channel_mult=(1, 2, 3, 3), te_width=48, te_mlp=192, vae_channels=32)


def _first(keys: Sequence[str], n: int = 3) -> str:
    return ", ".join(sorted(keys)[:n])


def detect(shapes: Mapping[str, Sequence[int]]) -> SD1Config:
    """Return the SD 1.x config of a checkpoint given {key: shape}, or raise UnsupportedModelError."""
    keys = list(shapes)
    U = "model.diffusion_model."
    if not keys:
        raise UnsupportedModelError("The file holds no tensors.")
    if any(k.startswith("conditioner.embedders.") for k in keys) or f"{U}label_emb.0.0.weight" in shapes:
        raise UnsupportedModelError("This is an SDXL checkpoint (found 'conditioner.embedders' / 'label_emb'); "
                                    "only SD 1.x checkpoints are supported.")
    lora = [k for k in keys if "lora_" in k or ".lora." in k or k.startswith(("lora_unet", "lora_te"))]
    if lora and not any(k.startswith(U) for k in keys):
        raise UnsupportedModelError(f"This is a LoRA/LyCORIS file ({len(lora)} LoRA keys, e.g. {_first(lora, 1)}), "
                                    "not a full checkpoint; bake it into a model first.")
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        raise UnsupportedModelError("This is an SD 2.x checkpoint (OpenCLIP text encoder "
                                    "'cond_stage_model.model.*'); only SD 1.x is supported.")
    if f"{U}input_blocks.0.0.weight" not in shapes:
        vae = ("encoder.conv_in.weight", "decoder.conv_in.weight", "decoder.conv_out.weight")
        if any(k in shapes or f"first_stage_model.{k}" in shapes for k in vae) and not any(
                k.startswith(("cond_stage_model.", U)) for k in keys):
            raise UnsupportedModelError("This is a standalone VAE (only 'encoder.*' / 'decoder.*' keys), not a full "
                                        "checkpoint; pick a full SD 1.x model.")
        if any(k.startswith(("down_blocks.", "unet.", "text_model.")) for k in keys):
            raise UnsupportedModelError("This looks like a diffusers-format model; convert it to a single-file "
                                        "(LDM) checkpoint first.")
        raise UnsupportedModelError(f"This is not a Stable Diffusion checkpoint: no SD UNet found ({len(keys)} "
                                    f"keys, e.g. {_first(keys)}); pick an SD 1.x model.")

    def shape(key: str) -> Sequence[int]:
        if key not in shapes:
            raise UnsupportedModelError(f"Unrecognised UNet layout: '{key}' is missing.")
        return shapes[key]

    conv_in = shape(f"{U}input_blocks.0.0.weight")
    mc = int(conv_in[0])
    to_k = shape(f"{U}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    context_dim = int(to_k[1])
    proj_in = shape(f"{U}input_blocks.1.1.proj_in.weight")
    if len(proj_in) == 2 or context_dim == 1024:
        raise UnsupportedModelError(f"This is an SD 2.x-style UNet (context width {context_dim}, "
                                    f"{'linear' if len(proj_in) == 2 else 'conv'} proj_in); only SD 1.x is supported.")
    mult = (1, int(shape(f"{U}input_blocks.4.0.in_layers.2.weight")[0]) // mc,
            int(shape(f"{U}input_blocks.7.0.in_layers.2.weight")[0]) // mc,
            int(shape(f"{U}input_blocks.10.0.in_layers.2.weight")[0]) // mc)

    te = "cond_stage_model.transformer.text_model."
    tok = shapes.get(f"{te}embeddings.token_embedding.weight")
    if tok is None:
        raise UnsupportedModelError("The CLIP text encoder is missing (no 'cond_stage_model.transformer' keys).")
    te_layers = 0
    while f"{te}encoder.layers.{te_layers}.mlp.fc1.weight" in shapes:
        te_layers += 1
    vae_ch = shapes.get("first_stage_model.encoder.conv_in.weight")
    config = replace(
        SD15,
        unet_in_channels=int(conv_in[1]),
        unet_out_channels=int(shape(f"{U}out.2.weight")[0]),
        model_channels=mc,
        channel_mult=mult,
        te_width=int(tok[1]),
        te_vocab=int(tok[0]),
        te_layers=te_layers,
        te_mlp=int(shapes[f"{te}encoder.layers.0.mlp.fc1.weight"][0]),
        te_positions=int(shapes[f"{te}embeddings.position_embedding.weight"][0]),
        vae_channels=int(vae_ch[0]) if vae_ch is not None else SD15.vae_channels,
    )
    if config.te_width != context_dim:
        raise UnsupportedModelError(f"Text encoder width {config.te_width} does not match the UNet's context "
                                    f"width {context_dim}; this is not an SD 1.x checkpoint.")
    if config.te_width % config.te_heads or mc % config.unet_heads or mc % config.gn_groups:
        raise UnsupportedModelError(f"Unrecognised SD 1.x widths (UNet {mc}, text encoder {config.te_width}).")
    return config


def check_layout(config: SD1Config, shapes: Mapping[str, Sequence[int]], has_vae: bool = True) -> None:
    """Raise UnsupportedModelError unless every key of the config's layout is present with the right shape."""
    from ..parts import part_of
    from .spec import build_spec

    expected = build_spec(config).shapes
    optional = {"cond_stage_model.transformer.text_model.embeddings.position_ids"}
    missing = [k for k in expected if k not in shapes and k not in optional
               and not (part_of(k) == "vae" and not has_vae) and part_of(k) != "other"]
    if missing:
        raise UnsupportedModelError(f"{config.variant} layout expected, but {len(missing)} keys are missing "
                                    f"(e.g. {_first(missing, 2)}).")
    wrong = [k for k in expected if k in shapes and tuple(shapes[k]) != expected[k] and k not in optional]
    if wrong:
        k = wrong[0]
        raise UnsupportedModelError(f"{config.variant} layout expected, but {len(wrong)} tensors have unexpected "
                                    f"shapes (e.g. {k}: {tuple(shapes[k])}, expected {expected[k]}).")
