"""The SDXL architecture as data: every tensor's shape in the single-file (SGM) layout, and every legal
permutation group.

One walk (`build_spec`) mirrors SDXL's forward pass with the shared walker blocks of `archspec.py`, under the rules
written out in `sd1/spec.py` (residual streams through identity skips, transformers and the decoder's
concatenations, GroupNorm(32) partitions and their straddles, whole attention heads with q/k and v/o inside them,
both GEGLU halves on one permutation). What SDXL adds:
- 64-channel heads everywhere: a UNet attention of width C has C / 64 heads; CLIP-L and CLIP-G likewise;
- transformer depth per level (several transformer blocks share their `proj_in` stream), linear proj_in/out;
- `label_emb`: the ADM vector (pooled CLIP-G projection and the size/crop features) goes through its own hidden
  layer into the time embedding's `emb` stream, which it is added to;
- two text encoders: CLIP-L (transformers' layout) and OpenCLIP ViT-bigG (OpenCLIP's layout, q/k/v fused in
  `in_proj`). The UNet's cross-attention reads their penultimate hidden states side by side, so each encoder's
  residual stream owns its slice of every `attn2.to_k/to_v` input: CLIP-L the first `clip_l_width` columns,
  CLIP-G the rest;
- fixed: latent channels, RGB, the timestep sinusoid, the ADM input (pooled projection space included: the
  projection's output axis never moves), token ids and positions.
"""

from __future__ import annotations

from ..archspec import ArchSpec, Layout, SpecWalker, layout_width
from ..parts import UNET, VAE
from .config import CLIP_G, CLIP_L, SDXLConfig

# Keys SDXL files often lack (the encoders' final norms and pooled projection, kept by full saves and dropped by
# clip-skip-pruned ones; position_ids is a buffer some savers skip): accepted when absent.
OPTIONAL = frozenset({
    f"{CLIP_L}embeddings.position_ids", f"{CLIP_L}final_layer_norm.weight", f"{CLIP_L}final_layer_norm.bias",
    f"{CLIP_G}ln_final.weight", f"{CLIP_G}ln_final.bias", f"{CLIP_G}text_projection", f"{CLIP_G}logit_scale",
})


class _Walker(SpecWalker):
    def __init__(self, config: SDXLConfig) -> None:
        super().__init__(config.gn_groups)
        self.c = config

    def spatial_transformer(self, p: str, x: Layout, name: str, context: Layout, depth: int) -> None:
        c = layout_width(x)
        heads = self.c.heads(c)
        self.norm(f"{p}.norm", x, self.gn_groups)
        t = self.group(f"{name}.inner", c, "transformer_inner")
        self.linear(f"{p}.proj_in", t, x)
        for j in range(depth):
            b, n = f"{p}.transformer_blocks.{j}", f"{name}.{j}"
            self.norm(f"{b}.norm1", t)
            self.attention(f"{b}.attn1", f"{n}.attn1", t, t, heads, bias_qkv=False)
            self.norm(f"{b}.norm2", t)
            self.attention(f"{b}.attn2", f"{n}.attn2", t, context, heads, bias_qkv=False)
            self.norm(f"{b}.norm3", t)
            hidden = self.group(f"{n}.ff", 4 * c, "ff_hidden")
            self.linear(f"{b}.ff.net.0.proj", hidden + hidden, t)  # GEGLU: value and gate halves share the perm
            self.linear(f"{b}.ff.net.2", t, hidden)
        self.linear(f"{p}.proj_out", x, t)

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
        label = self.group("unet.label_emb.hidden", temb, "label_hidden")
        self.linear(f"{P}label_emb.0.0", label, self.fixed(c.adm_channels))
        self.linear(f"{P}label_emb.0.2", emb, label)  # added to the time embedding: the same `emb` stream

        self.unet_body(P, mc, c.channel_mult, c.num_res_blocks, c.unet_in_channels, c.unet_out_channels, emb,
                       lambda level: bool(c.transformer_depth[level]),
                       lambda p, h, name, level: self.spatial_transformer(p, h, name, context,
                                                                          c.transformer_depth[level]))

    def text_encoders(self) -> Layout:
        """Both encoders; returns the UNet's context layout: CLIP-L's stream, then CLIP-G's."""
        c = self.c
        self.part = "te"
        clip_l = self.clip_text(CLIP_L, "te.clip_l", c.clip_l_width, c.clip_l_layers, c.heads(c.clip_l_width),
                                c.clip_l_mlp, c.clip_l_vocab, c.text_positions)
        clip_g = self.open_clip_text(CLIP_G, "te.clip_g", c.clip_g_width, c.clip_g_layers,
                                     c.heads(c.clip_g_width), c.clip_g_mlp, c.clip_g_vocab, c.text_positions,
                                     c.clip_g_projection)
        return clip_l + clip_g


def build_spec(config: SDXLConfig) -> ArchSpec[SDXLConfig]:
    """Walk the architecture once; return its key layout and permutation groups."""
    w = _Walker(config)
    context = w.text_encoders()
    w.unet(context)
    w.vae(VAE, config.vae_channels, config.vae_mult, config.vae_res_blocks, config.vae_z)
    return w.spec(config)

