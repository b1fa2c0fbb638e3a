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

from ..archspec import ArchSpec, Layout, SpecWalker, layout_width
from ..parts import UNET, VAE
from .config import SD1Config

TE = "cond_stage_model.transformer.text_model."

SCHEDULE_BUFFERS = (
    "alphas_cumprod", "alphas_cumprod_prev", "betas", "log_one_minus_alphas_cumprod",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2", "posterior_variance",
    "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
)


class _Walker(SpecWalker):
    def __init__(self, config: SD1Config) -> None:
        super().__init__(config.gn_groups)
        self.c = config

    # -- UNet -------------------------------------------------------------------------------------------------
    def spatial_transformer(self, p: str, x: Layout, name: str, context: Layout) -> None:
        c = layout_width(x)
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

        self.unet_body(P, mc, c.channel_mult, c.num_res_blocks, c.unet_in_channels, c.unet_out_channels, emb,
                       lambda level: level in c.attention_levels,
                       lambda p, h, name, _: self.spatial_transformer(p, h, name, context))

    # -- text encoder and VAE -----------------------------------------------------------------------------------
    def text_encoder(self) -> Layout:
        c = self.c
        self.part = "te"
        return self.clip_text(TE, "te", c.te_width, c.te_layers, c.te_heads, c.te_mlp, c.te_vocab, c.te_positions)


def build_spec(config: SD1Config) -> ArchSpec[SD1Config]:
    """Walk the architecture once; return its key layout and permutation groups."""
    w = _Walker(config)
    context = w.text_encoder()
    w.unet(context)
    w.vae(VAE, config.vae_channels, config.vae_mult, config.vae_res_blocks, config.vae_z)
    w.part = "other"
    for name in SCHEDULE_BUFFERS:
        w.tensor(name, (config.timesteps,))
    return w.spec(config)

