"""Residual blocks and resampling layers (BigGAN / ADM style, Imagen F.1 and B.1)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from imagen_ds.models.attention import zero_init


class ResBlock(nn.Module):
    """GroupNorm(32)-SiLU-conv, scale-shift from emb, GroupNorm-SiLU-dropout-conv(zero init).

    out = skip_scale * shortcut(x) + h. `resample` ("up" | "down" | None) resamples both paths
    inside the block (BigGAN). The UNet keeps skip_scale 1; the Efficient U-Net uses 1/sqrt(2)
    and always has a 1x1 shortcut conv (paper B.1).
    """

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, *,
                 resample: str | None = None, skip_scale: float = 1.0, conv_shortcut: bool = False):
        super().__init__()
        self.resample, self.skip_scale = resample, skip_scale
        self.norm1 = nn.GroupNorm(32, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_ch)                   # -> (scale, shift)
        self.norm2 = nn.GroupNorm(32, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))   # block starts as the identity
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if (in_ch != out_ch or conv_shortcut) else nn.Identity()

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context=None, context_mask=None) -> torch.Tensor:
        h = F.silu(self.norm1(x))
        h = self.conv1(self._resample(h))                                  # [B, out, H', W']
        x = self._resample(x)
        scale, shift = self.emb_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip_scale * self.shortcut(x) + h


class Downsample(nn.Module):
    """Stride-2 convolution (UNet: 3x3; Efficient U-Net: 4x4 as in NeMo)."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel, stride=2, padding=(kernel - 1) // 2)

    def forward(self, x, emb=None, context=None, context_mask=None):
        return self.conv(x)


class Upsample(nn.Module):
    """Transposed 4x4 stride-2 convolution (learned up-sampling that also runs in bf16)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.ConvTranspose2d(channels, channels, 4, stride=2, padding=1)

    def forward(self, x, emb=None, context=None, context_mask=None):
        return self.conv(x)


EFFICIENT_SKIP_SCALE = 1 / math.sqrt(2)
