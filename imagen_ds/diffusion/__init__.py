"""Diffusion schemes (continuous DDPM, EDM), samplers, guidance, noise augmentation, the cascade.

`build_diffusion(cfg)` returns the scheme named by cfg.diffusion.scheme, with
`.training_loss(net, images, text_emb, text_mask, lowres=None) -> [B]` and
`.sample(net, text_emb, text_mask, lowres=None, *, shape, sampling=None, generator, aug_level=None,
progress=False) -> images in [-1, 1]`.
"""
from __future__ import annotations

from imagen_ds.config import ImagenConfig
from imagen_ds.diffusion.ddpm import DDPM
from imagen_ds.diffusion.edm import EDM
from imagen_ds.diffusion.scheme import Diffusion


def build_diffusion(cfg: ImagenConfig) -> Diffusion:
    return {"edm": EDM, "ddpm": DDPM}[cfg.diffusion.scheme](cfg)


__all__ = ["build_diffusion", "Diffusion", "EDM", "DDPM"]
