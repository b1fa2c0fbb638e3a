"""An independent SDXL forward pass for single-file (SGM) state dicts, built only from diffusers and transformers.

Nothing here reads `lib_rebasin.sdxl.spec`: the model configs are written out from the `SDXLConfig`
hyper-parameters, the weights go through diffusers' own single-file converters (`convert_ldm_unet_checkpoint` with
SDXL's `text_time` addition embedding, `convert_ldm_clip_checkpoint` for CLIP-L, `convert_open_clip_checkpoint`
for OpenCLIP bigG, `convert_ldm_vae_checkpoint`) and are loaded strictly into `UNet2DConditionModel`,
`CLIPTextModel`, `CLIPTextModelWithProjection` and `AutoencoderKL`. Every SGM key of a part must reach the
converted weights exactly once (a converter silently drops keys it does not map).

SDXL's conditioning, as its pipeline builds it: both encoders' penultimate hidden states side by side (CLIP-L's
then CLIP-G's) as the cross-attention context; CLIP-G's pooled, projected output and the six size/crop values as
the `text_time` embedding's inputs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_open_clip_checkpoint,
)
from reference import _no_meta, _own_storage, _storage, convert_vae, vae_config
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from lib_rebasin.sdxl.config import SDXLConfig

UNET = "model.diffusion_model."
CLIP_L = "conditioner.embedders.0.transformer."
CLIP_G = "conditioner.embedders.1.model."
VAE = "first_stage_model."
TIME_IDS = 6  # original size, crop offset, target size: two values each


def size_features(c: SDXLConfig) -> int:
    """The width of each of the six Fourier-embedded size/crop values: what the ADM input holds besides the
    pooled CLIP-G projection."""
    extra = c.adm_channels - c.clip_g_projection
    assert extra > 0 and extra % TIME_IDS == 0, c
    return extra // TIME_IDS


def unet_config(c: SDXLConfig) -> dict:
    levels = range(len(c.channel_mult))
    widths = [c.model_channels * m for m in c.channel_mult]
    return {
        "sample_size": 32,
        "in_channels": c.unet_in_channels,
        "out_channels": c.unet_out_channels,
        "down_block_types": tuple("CrossAttnDownBlock2D" if c.transformer_depth[lv] else "DownBlock2D"
                                  for lv in levels),
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": tuple("CrossAttnUpBlock2D" if c.transformer_depth[lv] else "UpBlock2D"
                                for lv in reversed(levels)),
        "block_out_channels": tuple(widths),
        "layers_per_block": c.num_res_blocks,
        "transformer_layers_per_block": tuple(max(d, 1) for d in c.transformer_depth),
        "cross_attention_dim": c.context_dim,
        # diffusers' legacy naming: `attention_head_dim` is the number of heads, per level (64 channels each).
        "attention_head_dim": tuple(max(w // c.head_channels, 1) for w in widths),
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": size_features(c),
        "projection_class_embeddings_input_dim": c.adm_channels,
        "norm_num_groups": c.gn_groups,
        "norm_eps": 1e-5,
        "act_fn": "silu",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "downsample_padding": 1,
        "center_input_sample": False,
    }


def _clip_config(width: int, layers: int, mlp: int, vocab: int, positions: int, act: str,
                 projection: int | None = None) -> CLIPTextConfig:
    bos, eos = (49406, 49407) if vocab > 49407 else (vocab - 2, vocab - 1)
    kw = {"projection_dim": projection} if projection is not None else {}
    return CLIPTextConfig(vocab_size=vocab, hidden_size=width, intermediate_size=mlp, num_hidden_layers=layers,
                          num_attention_heads=width // 64, max_position_embeddings=positions, hidden_act=act,
                          layer_norm_eps=1e-5, bos_token_id=bos, eos_token_id=eos, pad_token_id=1, **kw)


def clip_l_config(c: SDXLConfig) -> CLIPTextConfig:
    return _clip_config(c.clip_l_width, c.clip_l_layers, c.clip_l_mlp, c.clip_l_vocab, c.text_positions,
                        "quick_gelu")


def clip_g_config(c: SDXLConfig) -> CLIPTextConfig:
    return _clip_config(c.clip_g_width, c.clip_g_layers, c.clip_g_mlp, c.clip_g_vocab, c.text_positions, "gelu",
                        projection=c.clip_g_projection)


# -- conversion with a consumption check -------------------------------------------------------------------------
def _check_consumed(prefix: str, ldm: Mapping[str, torch.Tensor], converted: Mapping[str, torch.Tensor],
                    copied: Mapping[str, torch.Tensor] = {}, ignored: tuple[str, ...] = ()) -> None:
    """Every SGM key under `prefix` reaches exactly one converted tensor: by storage (the converters index or
    re-key), or, for the keys a converter copies (`copied`: SGM key -> the value it must reproduce), by value."""
    source = {k: v for k, v in ldm.items() if k.startswith(prefix) and k not in ignored and k not in copied}
    by_storage = {_storage(v): k for k, v in source.items()}
    assert len(by_storage) == len(source), "test input shares storage"
    used: dict[str, list[str]] = {}
    for dk, v in converted.items():
        src = by_storage.get(_storage(v))
        if src is not None:
            used.setdefault(src, []).append(dk)
    unused = sorted(set(source) - set(used))
    twice = {k: v for k, v in used.items() if len(v) > 1}
    assert not unused, f"{prefix}: {len(unused)} keys not consumed by diffusers' converter: {unused[:5]}"
    assert not twice, f"{prefix}: keys mapped more than once: {list(twice.items())[:3]}"
    for key, value in copied.items():
        assert torch.equal(ldm[key], value), f"{prefix}: {key} was not reproduced by the converter"


def convert_unet(c: SDXLConfig, ldm: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = convert_ldm_unet_checkpoint(dict(ldm), unet_config(c))
    _check_consumed(UNET, ldm, out)
    return out


def _fit_to(model: torch.nn.Module, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The converter's keys -> the installed transformers' keys (transformers >= 5's CLIPTextModel has no
    `text_model.` prefix; `position_ids` is a non-persistent buffer there and must equal arange)."""
    want = set(model.state_dict())
    if not any(k.startswith("text_model.") for k in want):
        out = {k.removeprefix("text_model."): v for k, v in out.items()}
    for k in [k for k in out if k.endswith("embeddings.position_ids") and k not in want]:
        pid = out.pop(k)
        assert torch.equal(pid.reshape(-1).long(), torch.arange(pid.numel())), "position_ids is not arange"
    return out


def convert_clip_l(model: CLIPTextModel, ldm: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    part = {k: v for k, v in ldm.items() if k.startswith(CLIP_L)}
    out = convert_ldm_clip_checkpoint(part)
    _check_consumed(CLIP_L, ldm, out)
    return _fit_to(model, out)


def convert_clip_g(model: CLIPTextModelWithProjection, ldm: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP -> transformers; the converter copies two kinds of keys (q/k/v split out of `in_proj`, the
    transposed `text_projection`): they are checked by value. `logit_scale` has no place in a text model."""
    part = {k: v for k, v in ldm.items() if k.startswith(CLIP_G)}
    out = convert_open_clip_checkpoint(model, part, prefix=CLIP_G)
    layers = "text_model.encoder.layers" if any(k.startswith("text_model.") for k in out) else "encoder.layers"
    copied = {f"{CLIP_G}text_projection": out["text_projection.weight"].T}
    for k in part:
        if k.endswith((".in_proj_weight", ".in_proj_bias")):
            i = k.split("resblocks.")[1].split(".")[0]
            kind = "weight" if k.endswith("weight") else "bias"
            copied[k] = torch.cat([out[f"{layers}.{i}.self_attn.{n}_proj.{kind}"]
                                   for n in ("q", "k", "v")])
    _check_consumed(CLIP_G, ldm, out, copied, ignored=(f"{CLIP_G}logit_scale",))
    return _fit_to(model, out)


# -- models ------------------------------------------------------------------------------------------------------
@dataclass
class SDXLReference:
    config: SDXLConfig
    unet: UNet2DConditionModel | None
    clip_l: CLIPTextModel | None
    clip_g: CLIPTextModelWithProjection | None
    vae: AutoencoderKL | None

    @classmethod
    def build(cls, c: SDXLConfig, parts: tuple[str, ...] = ("unet", "te", "vae")) -> SDXLReference:
        with torch.device("meta"):
            unet = UNet2DConditionModel(**unet_config(c)) if "unet" in parts else None
            vae = AutoencoderKL(**vae_config(c)) if "vae" in parts else None
        clip_l = CLIPTextModel(clip_l_config(c)) if "te" in parts else None
        clip_g = CLIPTextModelWithProjection(clip_g_config(c)) if "te" in parts else None
        for m in (unet, vae, clip_l, clip_g):
            if m is not None:
                m.eval().requires_grad_(False)
        return cls(c, unet, clip_l, clip_g, vae)

    def load(self, ldm: Mapping[str, torch.Tensor], parts: tuple[str, ...] = ("unet", "te", "vae")) -> None:
        ldm = _own_storage({k: v.float() if v.is_floating_point() else v for k, v in ldm.items()})
        if "unet" in parts:
            self.unet.load_state_dict(convert_unet(self.config, ldm), strict=True, assign=True)
            _no_meta(self.unet)
        if "vae" in parts:
            self.vae.load_state_dict(convert_vae(self.config, ldm), strict=True, assign=True)
            _no_meta(self.vae)
        if "te" in parts:
            self.clip_l.load_state_dict(convert_clip_l(self.clip_l, ldm), strict=True)
            self.clip_g.load_state_dict(convert_clip_g(self.clip_g, ldm), strict=True)

    # -- forward passes --------------------------------------------------------------------------------------
    @torch.no_grad()
    def text(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """The conditioning SDXL takes from its encoders, and their last outputs:
        `context` (penultimate hidden states, CLIP-L then CLIP-G), `pooled` (CLIP-G's projection),
        `clip_l_last` / `clip_g_last` (each encoder's final, normalised hidden state)."""
        lo = self.clip_l(input_ids=ids, output_hidden_states=True)
        go = self.clip_g(input_ids=ids, output_hidden_states=True)
        return {"context": torch.cat([lo.hidden_states[-2], go.hidden_states[-2]], dim=-1),
                "pooled": go.text_embeds, "clip_l_last": lo.last_hidden_state, "clip_g_last": go.last_hidden_state}

    @torch.no_grad()
    def eps(self, latent: torch.Tensor, t: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
            time_ids: torch.Tensor) -> torch.Tensor:
        return self.unet(latent, t, encoder_hidden_states=context,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample

    @torch.no_grad()
    def end_to_end(self, latent: torch.Tensor, t: torch.Tensor, ids: torch.Tensor,
                   time_ids: torch.Tensor) -> torch.Tensor:
        cond = self.text(ids)
        return self.eps(latent, t, cond["context"], cond["pooled"], time_ids)

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(image).latent_dist.parameters

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent).sample


# -- fixed inputs --------------------------------------------------------------------------------------------------
@dataclass
class SDXLInputs:
    ids: torch.Tensor
    latent: torch.Tensor
    t: torch.Tensor
    context: torch.Tensor
    pooled: torch.Tensor
    time_ids: torch.Tensor
    image: torch.Tensor
    z: torch.Tensor


def make_inputs(c: SDXLConfig, latent_size: int = 16, image_size: int = 32, batch: int = 2,
                seed: int = 1234) -> SDXLInputs:
    torch.manual_seed(seed)
    vocab = min(c.clip_l_vocab, c.clip_g_vocab)
    ids = torch.randint(0, vocab - 2, (batch, c.text_positions))
    for row, at in enumerate(range(batch)):  # one end-of-text token per prompt, where the pooled output is read
        ids[row, 9 + 23 * at] = vocab - 1
    return SDXLInputs(
        ids=ids,
        latent=torch.randn(batch, c.unet_in_channels, latent_size, latent_size),
        t=torch.tensor([17, 743][:batch] + [500] * max(0, batch - 2)),
        context=torch.randn(batch, c.text_positions, c.context_dim),
        pooled=torch.randn(batch, c.clip_g_projection),
        time_ids=torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * batch),
        image=torch.rand(batch, 3, image_size, image_size) * 2 - 1,
        z=torch.randn(batch, c.vae_z, image_size // 8, image_size // 8),
    )
