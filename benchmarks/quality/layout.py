"""The benchmark's models: SD 1.x topology at reduced width, trained in diffusers' layout, stored in LDM layout.

Training uses diffusers' `UNet2DConditionModel` and transformers' `CLIPTextModel` (independent of our spec). The
single-file (LDM) layout every merge reads is obtained with diffusers' own LDM -> diffusers converter: it only
re-keys tensors, so converting a state dict whose tensors each own their storage tells us, per storage, which
LDM key becomes which diffusers key. That bijection (checked complete and shape-preserving) maps a trained model
to an LDM checkpoint and a merged checkpoint back to a model to evaluate.

The text encoder is the small CLIP the checkpoint layout needs. It is never trained: one fixed random encoder
(seed 0) is shared by every model, and it turns a class token into the cross-attention context. A merge still
blends and permutes it like any text encoder (merges use the UNet and the text encoder), and every model is
evaluated through its own, possibly merged, encoder. The VAE is a fixed random one (width 32) that nothing uses:
the digits' encoding is the latent space; it is there because a full checkpoint (and legacy mode) needs one, and
merges leave it alone (A's is kept).
"""

from __future__ import annotations

import os
from dataclasses import replace
from functools import lru_cache

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from lib_rebasin.parts import part_of  # noqa: E402
from lib_rebasin.sd1.config import SD15, SD1Config  # noqa: E402
from lib_rebasin.sd1.spec import build_spec  # noqa: E402
from lib_rebasin.synthetic_weights import random_tensor  # noqa: E402

UNET_PREFIX = "model.diffusion_model."
TE_PREFIX = "cond_stage_model.transformer.text_model."
# Class tokens 0..9, a "no class" token for classifier-free guidance, then CLIP's specials.
NULL_CLASS = 10
TE_VOCAB = 16
BOS, EOS = TE_VOCAB - 2, TE_VOCAB - 1
PAD = 12


def sd_config(width: int) -> SD1Config:
    """Full SD 1.5 UNet topology (4 levels, 2 ResBlocks each, attention at levels 0-2, 8 heads, GroupNorm 32)
    at UNet width `width`, with a one-layer CLIP of width 48 (12 heads) as the text encoder."""
    return replace(SD15, model_channels=width, te_width=48, te_layers=1, te_mlp=192, te_vocab=TE_VOCAB,
                   vae_channels=32)


def unet_config(c: SD1Config) -> dict:
    levels = range(len(c.channel_mult))
    return {
        "sample_size": 8,
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
        "attention_head_dim": c.unet_heads,  # diffusers' legacy naming: the number of heads for SD 1.x
        "norm_num_groups": c.gn_groups,
        "norm_eps": 1e-5,
        "act_fn": "silu",
        "use_linear_projection": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "downsample_padding": 1,
        "center_input_sample": False,
    }


def clip_config(c: SD1Config) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=c.te_vocab, hidden_size=c.te_width, intermediate_size=c.te_mlp,
                          num_hidden_layers=c.te_layers, num_attention_heads=c.te_heads,
                          max_position_embeddings=c.te_positions, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                          bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)


def new_unet(c: SD1Config, seed: int) -> UNet2DConditionModel:
    """diffusers' own initialisation, drawn from `seed`."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(**unet_config(c))


@lru_cache(maxsize=None)
def unet_key_map(c: SD1Config) -> dict[str, str]:
    """LDM key -> diffusers key for every UNet tensor (a bijection, checked)."""
    spec = build_spec(c)
    ldm = {k: torch.zeros(s) for k, s in spec.shapes.items() if part_of(k) == "unet"}
    by_storage = {v.untyped_storage().data_ptr(): k for k, v in ldm.items()}
    converted = convert_ldm_unet_checkpoint(dict(ldm), unet_config(c))
    mapping = {by_storage[v.untyped_storage().data_ptr()]: dk for dk, v in converted.items()}
    if len(mapping) != len(ldm) or len(set(mapping.values())) != len(ldm):
        raise RuntimeError(f"diffusers' converter is not a bijection on this layout ({len(mapping)} of {len(ldm)})")
    for lk, dk in mapping.items():
        if tuple(converted[dk].shape) != tuple(ldm[lk].shape):
            raise RuntimeError(f"{lk} -> {dk} changes shape")
    return mapping


def unet_to_ldm(c: SD1Config, unet_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {lk: unet_sd[dk].detach().float().contiguous() for lk, dk in unet_key_map(c).items()}


def unet_from_ldm(c: SD1Config, ldm: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {dk: ldm[lk].float() for lk, dk in unet_key_map(c).items()}


@lru_cache(maxsize=None)
def _shared_te_state(c: SD1Config) -> tuple[tuple[str, torch.Tensor], ...]:
    torch.manual_seed(0)
    te = CLIPTextModel(clip_config(c)).eval()
    return tuple((k, v.detach().clone()) for k, v in te.state_dict().items() if not k.endswith("position_ids"))


def te_ldm(c: SD1Config) -> dict[str, torch.Tensor]:
    """The shared text encoder in LDM layout."""
    return {TE_PREFIX + k.removeprefix("text_model."): v.clone() for k, v in _shared_te_state(c)}


@lru_cache(maxsize=None)
def _shared_vae_state(c: SD1Config) -> tuple[tuple[str, torch.Tensor], ...]:
    spec = build_spec(c)
    return tuple((k, random_tensor(k, s, seed=0)) for k, s in spec.shapes.items() if part_of(k) == "vae")


def vae_ldm(c: SD1Config) -> dict[str, torch.Tensor]:
    """The shared, unused VAE in LDM layout."""
    return {k: v.clone() for k, v in _shared_vae_state(c)}


def text_encoder_from_ldm(c: SD1Config, ldm: dict[str, torch.Tensor]) -> CLIPTextModel:
    te = CLIPTextModel(clip_config(c)).eval().requires_grad_(False)
    want = te.state_dict()
    prefixed = any(k.startswith("text_model.") for k in want)
    sd = {("text_model." if prefixed else "") + k.removeprefix(TE_PREFIX): v.float()
          for k, v in ldm.items() if k.startswith(TE_PREFIX) and not k.endswith("position_ids")}
    missing, unexpected = te.load_state_dict(sd, strict=False)
    if unexpected or [k for k in missing if not k.endswith("position_ids")]:
        raise RuntimeError(f"text encoder keys do not match: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return te


# The context is the prompt's own tokens, without padding to CLIP's 77 positions: with 74 PAD tokens the class
# token was 1/77 of what cross-attention averages over, the 11 contexts had cosine similarity 0.97-0.99 and a
# model trained 400 steps barely used its class (held-out loss 0.0848 with the true class, 0.0858 with none;
# measured 2026-12-01). Two of the three positions (the class token and EOS, which attends to it) now carry it.
PROMPT_LENGTH = 3


def class_tokens(c: SD1Config, labels: torch.Tensor) -> torch.Tensor:
    """[BOS, class, EOS] per label (NULL_CLASS = the unconditional prompt)."""
    ids = torch.empty((len(labels), PROMPT_LENGTH), dtype=torch.long)
    ids[:, 0] = BOS
    ids[:, 1] = labels
    ids[:, 2] = EOS
    return ids


@torch.no_grad()
def class_contexts(c: SD1Config, te: CLIPTextModel) -> torch.Tensor:
    """(11, PROMPT_LENGTH, te_width): the cross-attention context of each class and of the null class."""
    return te(input_ids=class_tokens(c, torch.arange(NULL_CLASS + 1))).last_hidden_state


def load_unet(c: SD1Config, ldm: dict[str, torch.Tensor]) -> UNet2DConditionModel:
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config(c))
    unet.load_state_dict(unet_from_ldm(c, ldm), strict=True, assign=True)
    return unet.eval().requires_grad_(False)
