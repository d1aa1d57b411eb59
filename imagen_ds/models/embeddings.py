"""Conditioning inputs of the networks: noise level, noise-augmentation level and text.

Both UNets share `Conditioning`: it turns (noise_cond, text, aug_level, cond_drop) into the
per-sample embedding `emb` [B, E] (E = 4 x base channels) that every residual block reads,
and the projected text tokens the attention layers attend to.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from imagen_ds.config import ImagenConfig

# DDPM-style sinusoidal embeddings use periods up to 10000 (Transformer, ADM, EDM).
MAX_PERIOD = 10000.0
# The augmentation level lives in [0, 1]; spread it like 1000 discrete DDPM steps so the
# sinusoid's fast frequencies can tell nearby levels apart.
AUG_LEVEL_SCALE = 1000.0


def sinusoidal_embedding(x: torch.Tensor, dim: int) -> torch.Tensor:
    """[B] -> [B, dim]: cos/sin of x at geometrically spaced frequencies 1 .. 1/MAX_PERIOD."""
    half = dim // 2
    freqs = torch.exp(-math.log(MAX_PERIOD) * torch.arange(half, device=x.device, dtype=torch.float32) / half)
    args = x.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class LevelEmbedding(nn.Module):
    """A scalar per sample -> sinusoid -> MLP to the block embedding width (paper F.1)."""

    def __init__(self, sinusoid_dim: int, emb_dim: int, scale: float = 1.0):
        super().__init__()
        self.sinusoid_dim, self.scale = sinusoid_dim, scale
        self.mlp = nn.Sequential(nn.Linear(sinusoid_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

    def forward(self, level: torch.Tensor) -> torch.Tensor:  # [B] -> [B, E]
        emb = sinusoidal_embedding(level * self.scale, self.sinusoid_dim)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class AttentionPooling(nn.Module):
    """Pool T text tokens into one vector with learned, mask-aware attention weights.

    NeMo's pooling lets padded tokens take part; here padded tokens get zero weight, so the
    pooled vector depends only on the caption's own tokens.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.score = nn.Linear(dim, 1, bias=False)  # a bias would cancel in the softmax

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # tokens [B, T, D], mask [B, T] (True = valid) -> [B, D]
        logits = self.score(tokens).squeeze(-1).float()                  # [B, T]
        logits = logits.masked_fill(~mask, float("-inf"))
        has_text = mask.any(dim=1, keepdim=True)                         # [B, 1]
        # a row with no valid token pools to zero instead of NaN
        weights = torch.softmax(logits.masked_fill(~has_text, 0.0), dim=1) * has_text
        return torch.einsum("bt,btd->bd", weights.to(tokens.dtype), tokens)


class Conditioning(nn.Module):
    """noise level (+ aug level) + pooled text -> emb [B, E]; text tokens -> context [B, T, cond_dim].

    Classifier-free guidance: rows with cond_drop=True see the null text instead of theirs:
    a single null token (the rest of the context masked) and a null pooled vector, both
    learned parameters or zeros (cfg.model.null_text).
    """

    def __init__(self, cfg: ImagenConfig):
        super().__init__()
        m = cfg.model
        text_dim, cond_dim = cfg.text.dim, m.cond_dim
        self.emb_dim = 4 * m.base_channels  # paper F.1 / ADM: time embedding = 4 x channels
        self.noise_embed = LevelEmbedding(m.base_channels, self.emb_dim)
        self.aug_embed = LevelEmbedding(m.base_channels, self.emb_dim, AUG_LEVEL_SCALE) if m.is_sr else None
        self.pool = AttentionPooling(text_dim)
        self.pool_proj = nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, cond_dim))
        self.pooled_to_emb = nn.Sequential(nn.LayerNorm(cond_dim), nn.Linear(cond_dim, self.emb_dim),
                                           nn.SiLU(), nn.Linear(self.emb_dim, self.emb_dim))
        self.text_to_cond = nn.Linear(text_dim, cond_dim)
        if m.null_text == "learned":
            self.null_token = nn.Parameter(torch.randn(cond_dim) * 0.02)
            self.null_pooled = nn.Parameter(torch.randn(cond_dim) * 0.02)
        else:
            self.register_buffer("null_token", torch.zeros(cond_dim), persistent=False)
            self.register_buffer("null_pooled", torch.zeros(cond_dim), persistent=False)

    def forward(self, noise_cond: torch.Tensor, text_emb: torch.Tensor, text_mask: torch.Tensor,
                aug_level: Optional[torch.Tensor], cond_drop: Optional[torch.Tensor]):
        dtype = self.text_to_cond.weight.dtype
        text_emb = text_emb.to(dtype)
        text_mask = text_mask.bool()
        pooled = self.pool_proj(self.pool(text_emb, text_mask))           # [B, cond]
        context = self.text_to_cond(text_emb)                             # [B, T, cond]
        if cond_drop is not None:
            drop = cond_drop.bool()
            pooled = torch.where(drop[:, None], self.null_pooled.to(dtype), pooled)
            null_ctx = torch.zeros_like(context)
            null_ctx[:, 0] = self.null_token.to(dtype)
            context = torch.where(drop[:, None, None], null_ctx, context)
            null_mask = torch.zeros_like(text_mask)
            null_mask[:, 0] = True
            text_mask = torch.where(drop[:, None], null_mask, text_mask)
        emb = self.noise_embed(noise_cond) + self.pooled_to_emb(pooled)   # [B, E]
        if self.aug_embed is not None:
            if aug_level is None:
                raise ValueError("super-resolution model needs aug_level")
            emb = emb + self.aug_embed(aug_level)
        # Passing no mask keeps SDPA on its flash / memory-efficient kernels. (Meta tensors,
        # used to count FLOPs, hold no values: they count as all valid.)
        all_valid = text_mask.device.type == "meta" or bool(text_mask.all())
        context_mask = None if all_valid else text_mask
        return emb, context, context_mask
