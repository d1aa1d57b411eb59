"""The denoising networks. `build_model(cfg)` returns the U-Net the config names.

The networks know nothing of diffusion: forward(x, noise_cond, text_emb, text_mask,
lowres=None, aug_level=None, cond_drop=None) -> tensor shaped like x.
"""
from __future__ import annotations

import torch.nn as nn

from imagen_ds.config import ImagenConfig
from imagen_ds.models.efficient_unet import EfficientUNet
from imagen_ds.models.unet import UNet

__all__ = ["build_model", "count_params", "UNet", "EfficientUNet"]


def build_model(cfg: ImagenConfig) -> nn.Module:
    """The network of cfg.model (`.config` holds cfg). Build under `torch.device("meta")` to count."""
    cls = {"UNet": UNet, "EfficientUNet": EfficientUNet}[cfg.model.unet]
    return cls(cfg)


def count_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
