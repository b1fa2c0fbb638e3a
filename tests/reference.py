"""An independent forward pass for SD 1.x LDM-layout state dicts, built only from diffusers and transformers.

Nothing here reads `lib_rebasin.sd1.spec`: the model configs are written out from the `SD1Config` hyper-parameters,
the weights go through diffusers' own single-file (LDM -> diffusers) converters, and are loaded strictly into
diffusers' `UNet2DConditionModel` / `AutoencoderKL` and transformers' `CLIPTextModel`. If our permutation spec and
this reference disagree about what a key means, the function-preservation tests fail.

Beyond the strict load (every diffusers parameter filled, every shape right) the conversion checks that every LDM
key of a part was consumed exactly once: diffusers' UNet converter e.g. accepts an upsample conv at `.1` or `.2`
and silently drops keys it does not map.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from lib_rebasin.sd1.config import SD1Config  # noqa: E402  (hyper-parameters only, no layout knowledge)

PREFIXES = {
    "unet": "model.diffusion_model.",
    "te": "cond_stage_model.transformer.",
    "vae": "first_stage_model.",
}
POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"


# -- configs written from the SD1Config fields ------------------------------------------------------------------
def unet_config(c: SD1Config) -> dict:
    levels = range(len(c.channel_mult))
    return {
        "sample_size": 64,
        "in_channels": c.unet_in_channels,
        "out_channels": c.unet_out_channels,
        "down_block_types": tuple("CrossAttnDownBlock2D" if lv in c.attention_levels else "DownBlock2D"
                                  for lv in levels),
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": tuple("CrossAttnUpBlock2D" if lv in c.attention_levels else "UpBlock2D"
                                for lv in reversed(levels)),
        "block_out_channels": tuple(c.model_channels * m for m in c.channel_mult),
        "layers_per_block": c.num_res_blocks,
        "cross_attention_dim": c.te_width,
        # diffusers' legacy naming: for SD 1.x `attention_head_dim` is the number of heads (8).
        "attention_head_dim": c.unet_heads,
        "norm_num_groups": c.gn_groups,
        "norm_eps": 1e-5,
        "act_fn": "silu",
        "use_linear_projection": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "downsample_padding": 1,
        "center_input_sample": False,
    }


def vae_config(c: SD1Config) -> dict:
    n = len(c.vae_mult)
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * n,
        "up_block_types": ("UpDecoderBlock2D",) * n,
        "block_out_channels": tuple(c.vae_channels * m for m in c.vae_mult),
        "layers_per_block": c.vae_res_blocks,
        "latent_channels": c.vae_z,
        "norm_num_groups": c.gn_groups,
        "act_fn": "silu",
        "sample_size": 64,
        "scaling_factor": 0.18215,
    }


def clip_config(c: SD1Config) -> CLIPTextConfig:
    # CLIP-L special tokens where the vocabulary is real-sized; inside the vocabulary for reduced test models.
    bos, eos = (49406, 49407) if c.te_vocab > 49407 else (c.te_vocab - 2, c.te_vocab - 1)
    return CLIPTextConfig(
        vocab_size=c.te_vocab,
        hidden_size=c.te_width,
        intermediate_size=c.te_mlp,
        num_hidden_layers=c.te_layers,
        num_attention_heads=c.te_heads,
        max_position_embeddings=c.te_positions,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=1,
    )


# -- conversion with a consumption check -------------------------------------------------------------------------
def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _check_consumed(part: str, ldm: Mapping[str, torch.Tensor], converted: Mapping[str, torch.Tensor],
                    ignored: tuple[str, ...] = ()) -> None:
    """Every LDM key of `part` must reach exactly one converted key (tracked by tensor storage; the converters
    only index, slice or re-key, never copy)."""
    source = {k: v for k, v in ldm.items() if k.startswith(PREFIXES[part]) and k not in ignored}
    by_storage: dict[int, str] = {}
    for k, v in source.items():
        assert _storage(v) not in by_storage, f"test input shares storage: {k} and {by_storage[_storage(v)]}"
        by_storage[_storage(v)] = k
    used: dict[str, list[str]] = {}
    for dk, v in converted.items():
        src = by_storage.get(_storage(v))
        assert src is not None, f"{part}: converted key {dk} does not come from any LDM key"
        used.setdefault(src, []).append(dk)
    unused = sorted(set(source) - set(used))
    twice = {k: v for k, v in used.items() if len(v) > 1}
    assert not unused, f"{part}: {len(unused)} LDM keys were not consumed by diffusers' converter: {unused[:5]}"
    assert not twice, f"{part}: LDM keys mapped more than once: {list(twice.items())[:3]}"


def _own_storage(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Give every tensor its own storage (safe for the storage-based consumption check); keeps fp32 values."""
    seen: set[int] = set()
    out = {}
    for k, v in sd.items():
        if _storage(v) in seen:
            v = v.clone()
        seen.add(_storage(v))
        out[k] = v
    return out


def convert_unet(c: SD1Config, ldm: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = convert_ldm_unet_checkpoint(dict(ldm), unet_config(c))
    _check_consumed("unet", ldm, out)
    return out


def convert_vae(c: SD1Config, ldm: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = convert_ldm_vae_checkpoint(dict(ldm), vae_config(c))
    _check_consumed("vae", ldm, out)
    return out


def convert_te(model: CLIPTextModel, ldm: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LDM text-encoder keys -> the installed transformers' CLIPTextModel keys (transformers >= 5 has no
    `text_model.` prefix; `position_ids` is a non-persistent buffer there and must equal arange)."""
    te = {k: v for k, v in ldm.items() if k.startswith(PREFIXES["te"])}
    out = convert_ldm_clip_checkpoint(te)
    _check_consumed("te", ldm, out)
    want = set(model.state_dict())
    if not any(k.startswith("text_model.") for k in want):
        out = {k.removeprefix("text_model."): v for k, v in out.items()}
    pid_key = next((k for k in out if k.endswith("embeddings.position_ids")), None)
    if pid_key is not None and pid_key not in want:
        pid = out.pop(pid_key)
        assert torch.equal(pid.reshape(-1).long(), torch.arange(pid.numel())), "position_ids is not arange"
    return out


# -- models ------------------------------------------------------------------------------------------------------
@dataclass
class Reference:
    """diffusers/transformers models for one SD1Config; `load(ldm_state_dict)` replaces all their weights."""

    config: SD1Config
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    te: CLIPTextModel

    @classmethod
    def build(cls, c: SD1Config, parts: tuple[str, ...] = ("unet", "te", "vae")) -> Reference:
        with torch.device("meta"):
            unet = UNet2DConditionModel(**unet_config(c)) if "unet" in parts else None
            vae = AutoencoderKL(**vae_config(c)) if "vae" in parts else None
        te = CLIPTextModel(clip_config(c)) if "te" in parts else None
        for m in (unet, vae, te):
            if m is not None:
                m.eval().requires_grad_(False)
        return cls(c, unet, vae, te)

    def load(self, ldm: Mapping[str, torch.Tensor], parts: tuple[str, ...] = ("unet", "te", "vae")) -> None:
        ldm = _own_storage({k: v.float() if v.is_floating_point() else v for k, v in ldm.items()})
        if "unet" in parts:
            self.unet.load_state_dict(convert_unet(self.config, ldm), strict=True, assign=True)
        if "vae" in parts:
            self.vae.load_state_dict(convert_vae(self.config, ldm), strict=True, assign=True)
        if "te" in parts:
            self.te.load_state_dict(convert_te(self.te, ldm), strict=True)
        for m in (self.unet, self.vae):
            if m is not None:
                _no_meta(m)

    # -- forward passes --------------------------------------------------------------------------------------
    @torch.no_grad()
    def text(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, 77) -> last hidden state (B, 77, width), after the final layer norm."""
        return self.te(input_ids=ids).last_hidden_state

    @torch.no_grad()
    def eps(self, latent: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.unet(latent, t, encoder_hidden_states=context).sample

    @torch.no_grad()
    def end_to_end(self, latent: torch.Tensor, t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.eps(latent, t, self.text(ids))

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Image -> the latent distribution's parameters (mean and log-variance, 2*z channels)."""
        return self.vae.encode(image).latent_dist.parameters

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent).sample


def _no_meta(m: torch.nn.Module) -> None:
    left = [n for n, t in list(m.named_parameters()) + list(m.named_buffers()) if t.is_meta]
    assert not left, f"{type(m).__name__}: tensors not loaded: {left[:5]}"


# -- fixed inputs --------------------------------------------------------------------------------------------------
@dataclass
class Inputs:
    ids: torch.Tensor
    latent: torch.Tensor
    t: torch.Tensor
    context: torch.Tensor
    image: torch.Tensor
    z: torch.Tensor


def make_inputs(c: SD1Config, latent_size: int = 16, image_size: int = 32, batch: int = 2, seed: int = 1234) -> Inputs:
    torch.manual_seed(seed)
    return Inputs(
        ids=torch.randint(0, c.te_vocab, (batch, c.te_positions)),
        latent=torch.randn(batch, c.unet_in_channels, latent_size, latent_size),
        t=torch.tensor([17, 743][:batch] + [500] * max(0, batch - 2)),
        context=torch.randn(batch, c.te_positions, c.te_width),
        image=torch.rand(batch, 3, image_size, image_size) * 2 - 1,
        z=torch.randn(batch, c.vae_z, image_size // 8, image_size // 8),
    )


def rel_max_error(x: torch.Tensor, y: torch.Tensor) -> float:
    """Relative max error max|x - y| / max|x|, with x the reference (unpermuted) output."""
    x, y = x.double(), y.double()
    return float((x - y).abs().max() / x.abs().max())
