"""Noise conditioning augmentation of the low-res image (Imagen section 2.5, cascaded diffusion).

The level a in [0, 1] is a time of the cosine DDPM forward process whatever the main scheme:
z = alpha(a) x + sigma(a) eps. Training draws a ~ U(0, train_max_level) per sample; sampling uses
one fixed level. The net receives a itself (aug_level) and embeds it.
"""
from __future__ import annotations

import torch

from imagen_ds.diffusion.schedules import alpha_sigma, logsnr_cosine


def augment_lowres(lowres: torch.Tensor, level: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """lowres [B, 3, h, w] in [-1, 1], level [B] in [0, 1], noise like lowres -> noised lowres."""
    alpha, sigma = (v.view(-1, 1, 1, 1) for v in alpha_sigma(logsnr_cosine(level.float())))
    return alpha * lowres + sigma * noise
