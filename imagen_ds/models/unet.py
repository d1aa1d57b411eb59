"""The Imagen U-Net (paper F.1; the base 64 px model and the regular SR U-Net).

ADM layout: init conv; per level `num_res_blocks` residual blocks (+ attention at the
configured sides), then a down-sample (stride-2 conv or a down ResBlock); a middle
ResBlock-attention-ResBlock; mirrored up path of num_res_blocks + 1 blocks per level that
each concatenate one skip; GroupNorm-SiLU-conv (zero init) out.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from imagen_ds.config import ImagenConfig
from imagen_ds.models.attention import AttentionBlock, num_heads_for, zero_init
from imagen_ds.models.blocks import Stage, concat_lowres, run
from imagen_ds.models.embeddings import Conditioning
from imagen_ds.models.resblock import Downsample, ResBlock, Upsample


class UNet(nn.Module):
    def __init__(self, cfg: ImagenConfig):
        super().__init__()
        self.config = cfg
        m = cfg.model
        self.is_sr, self.use_checkpoint = m.is_sr, m.checkpoint_activations
        self.cond = Conditioning(cfg)
        emb = self.cond.emb_dim

        def attention(ch: int) -> AttentionBlock:
            return AttentionBlock(m.attention_type, ch, num_heads_for(ch, m.head_dim, m.num_heads), m.cond_dim)

        def resblock(cin: int, cout: int, resample=None) -> ResBlock:
            return ResBlock(cin, cout, emb, m.dropout, resample=resample)

        ch = m.base_channels * m.channel_mults[0]
        in_ch = 2 * m.in_channels if m.is_sr else m.in_channels
        self.init_conv = nn.Conv2d(in_ch, ch, 3, padding=1)
        skips = [ch]
        side = m.resolution
        self.down = nn.ModuleList()
        for level, (mult, nblocks) in enumerate(zip(m.channel_mults, m.num_res_blocks)):
            for _ in range(nblocks):
                blocks = [resblock(ch, m.base_channels * mult)]
                ch = m.base_channels * mult
                if side in m.attention_resolutions:
                    blocks.append(attention(ch))
                self.down.append(Stage(blocks))
                skips.append(ch)
            if level < m.num_levels - 1:
                sample = resblock(ch, ch, "down") if m.resblock_updown else Downsample(ch, kernel=3)
                self.down.append(Stage([sample]))
                skips.append(ch)
                side //= 2

        mid = [resblock(ch, ch)] + ([attention(ch)] if m.mid_attention else []) + [resblock(ch, ch)]
        self.mid = Stage(mid)

        self.up = nn.ModuleList()
        for level in reversed(range(m.num_levels)):
            mult, nblocks = m.channel_mults[level], m.num_res_blocks[level]
            for i in range(nblocks + 1):
                blocks = [resblock(ch + skips.pop(), m.base_channels * mult)]
                ch = m.base_channels * mult
                if side in m.attention_resolutions:
                    blocks.append(attention(ch))
                if level > 0 and i == nblocks:
                    blocks.append(resblock(ch, ch, "up") if m.resblock_updown else Upsample(ch))
                    side *= 2
                self.up.append(Stage(blocks))

        self.out = nn.Sequential(nn.GroupNorm(32, ch), nn.SiLU(), zero_init(nn.Conv2d(ch, m.in_channels, 3, padding=1)))

    def forward(self, x, noise_cond, text_emb, text_mask, lowres=None, aug_level=None, cond_drop=None):
        # x [B, 3, H, W], noise_cond [B], text_emb [B, T, D], text_mask [B, T]
        emb, context, context_mask = self.cond(noise_cond, text_emb, text_mask, aug_level, cond_drop)
        dtype = self.init_conv.weight.dtype
        h = concat_lowres(x, lowres) if self.is_sr else x
        h = self.init_conv(h.to(dtype))
        emb = emb.to(dtype)
        hs = [h]
        for stage in self.down:
            h = run(stage, self.use_checkpoint, h, emb, context, context_mask)
            hs.append(h)
        h = run(self.mid, self.use_checkpoint, h, emb, context, context_mask)
        for stage in self.up:
            h = torch.cat([h, hs.pop()], dim=1)                            # concatenated skip
            h = run(stage, self.use_checkpoint, h, emb, context, context_mask)
        return self.out(h).to(x.dtype)
