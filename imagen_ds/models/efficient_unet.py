"""The Efficient U-Net (Imagen appendix B.1; NeMo's `sr` U-Net), used for super-resolution.

Level i of L: the DBlock down-samples FIRST (4x4 stride-2 conv; every level but the deepest,
as in NeMo), then runs num_res_blocks[i] residual blocks and, where configured, attention.
The UBlock mirrors it: blocks, attention, then a transposed-conv up-sample. Down-path
features are ADDED to the up path (not concatenated) and every residual shortcut is scaled by
1/sqrt(2): both keep the memory and compute at high resolution low (paper B.1).
So level i runs at resolution / 2^min(i + 1, L - 1) (see config.level_resolutions).
"""
from __future__ import annotations

import torch.nn as nn

from imagen_ds.config import ImagenConfig, level_resolutions
from imagen_ds.models.attention import AttentionBlock, num_heads_for, zero_init
from imagen_ds.models.blocks import concat_lowres, run
from imagen_ds.models.embeddings import Conditioning
from imagen_ds.models.resblock import EFFICIENT_SKIP_SCALE, Downsample, ResBlock, Upsample


class EfficientUNet(nn.Module):
    def __init__(self, cfg: ImagenConfig):
        super().__init__()
        self.config = cfg
        m = cfg.model
        self.is_sr, self.use_checkpoint = m.is_sr, m.checkpoint_activations
        self.cond = Conditioning(cfg)
        emb = self.cond.emb_dim
        sides = level_resolutions(m)

        def attention(ch: int) -> AttentionBlock:
            return AttentionBlock(m.attention_type, ch, num_heads_for(ch, m.head_dim, m.num_heads), m.cond_dim)

        def resblocks(cin: int, cout: int, n: int) -> list[ResBlock]:
            return [ResBlock(cin if i == 0 else cout, cout, emb, m.dropout,
                             skip_scale=EFFICIENT_SKIP_SCALE, conv_shortcut=True) for i in range(n)]

        prev = m.base_channels * m.channel_mults[0]
        in_ch = 2 * m.in_channels if m.is_sr else m.in_channels
        self.init_conv = nn.Conv2d(in_ch, prev, 3, padding=1)
        self.down_samples, self.down_blocks = nn.ModuleList(), nn.ModuleList()
        self.up_blocks, self.up_samples = nn.ModuleList(), nn.ModuleList()
        for level, (mult, n) in enumerate(zip(m.channel_mults, m.num_res_blocks)):
            ch = m.base_channels * mult
            resamples = level < m.num_levels - 1
            attends = sides[level] in m.attention_resolutions
            self.down_samples.append(Downsample(prev, kernel=4) if resamples else nn.Identity())
            self.down_blocks.append(nn.ModuleList(resblocks(prev, ch, n) + ([attention(ch)] if attends else [])))
            self.up_blocks.append(nn.ModuleList(resblocks(ch, prev, n) + ([attention(prev)] if attends else [])))
            self.up_samples.append(Upsample(prev) if resamples else nn.Identity())
            prev = ch
        ch0 = m.base_channels * m.channel_mults[0]
        self.out = zero_init(nn.Conv2d(ch0, m.in_channels, 1))  # the paper's final dense layer

    def forward(self, x, noise_cond, text_emb, text_mask, lowres=None, aug_level=None, cond_drop=None):
        emb, context, context_mask = self.cond(noise_cond, text_emb, text_mask, aug_level, cond_drop)
        dtype = self.init_conv.weight.dtype
        h = concat_lowres(x, lowres) if self.is_sr else x
        h = self.init_conv(h.to(dtype))                                    # [B, C0, H, W]
        emb = emb.to(dtype)
        skips = []
        for sample, blocks in zip(self.down_samples, self.down_blocks):
            h = sample(h)                                                  # down-sample first
            for block in blocks:
                h = run(block, self.use_checkpoint, h, emb, context, context_mask)
            skips.append(h)
        for level in reversed(range(len(self.up_blocks))):
            if level < len(self.up_blocks) - 1:
                h = h + skips[level]                                       # skips are added
            for block in self.up_blocks[level]:
                h = run(block, self.use_checkpoint, h, emb, context, context_mask)
            h = self.up_samples[level](h)                                  # up-sample last
        return self.out(h).to(x.dtype)
