"""Attention over image tokens, with text: fused (Imagen F.1), self, cross, or self then cross.

Every variant goes through F.scaled_dot_product_attention; a mask is passed only when some
text token is padding (any mask disables the flash kernel).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


def num_heads_for(channels: int, head_dim: Optional[int], num_heads: Optional[int]) -> int:
    """64-channel heads (heads = channels / head_dim) or a fixed head count."""
    return channels // head_dim if head_dim is not None else num_heads


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape                                                      # [B, N, C]
    return x.reshape(b, n, heads, c // heads).transpose(1, 2)              # [B, h, N, C/h]


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)                          # [B, N, C]


def zero_init(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class _Attention(nn.Module):
    """One residual attention layer: x + out(attn(q = image, k/v = image and/or text))."""

    def __init__(self, channels: int, heads: int, cond_dim: int, use_self: bool, use_text: bool):
        super().__init__()
        self.heads, self.use_self, self.use_text = heads, use_self, use_text
        self.norm = nn.GroupNorm(32, channels)
        self.to_q = nn.Linear(channels, channels)
        self.to_kv = nn.Linear(channels, 2 * channels) if use_self else None
        if use_text:
            self.text_norm = nn.LayerNorm(cond_dim)
            self.text_to_kv = nn.Linear(cond_dim, 2 * channels)
        self.out = zero_init(nn.Linear(channels, channels))  # block starts as the identity

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: Optional[torch.Tensor]) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)                    # [B, HW, C]
        q = self.to_q(tokens)
        keys, values, masks = [], [], []
        need_mask = self.use_text and context_mask is not None
        if self.use_self:
            k, v = self.to_kv(tokens).chunk(2, dim=-1)                      # [B, HW, C] each
            keys.append(k), values.append(v)
            if need_mask:
                masks.append(torch.ones(b, h * w, dtype=torch.bool, device=x.device))
        has_text = None
        if self.use_text:
            k, v = self.text_to_kv(self.text_norm(context.to(q.dtype))).chunk(2, dim=-1)  # [B, T, C]
            keys.append(k), values.append(v)
            if need_mask:
                masks.append(context_mask)
                if not self.use_self:
                    # cross-only: a row with no valid token attends to nothing and adds 0
                    has_text = context_mask.any(dim=1)
                    masks[-1] = context_mask | ~has_text[:, None]
        k, v = torch.cat(keys, dim=1), torch.cat(values, dim=1)              # [B, S, C]
        mask = torch.cat(masks, dim=1)[:, None, None, :] if masks else None  # [B, 1, 1, S]
        q, k, v = (split_heads(t, self.heads) for t in (q, k, v))
        a = merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))  # [B, HW, C]
        a = self.out(a)
        if has_text is not None:
            a = a * has_text[:, None, None].to(a.dtype)
        return x + a.transpose(1, 2).reshape(b, c, h, w)


class AttentionBlock(nn.Module):
    """The attention of one UNet position, of the configured type (config.ATTENTION_TYPES)."""

    def __init__(self, attention_type: str, channels: int, heads: int, cond_dim: int):
        super().__init__()
        self.attention_type = attention_type
        if attention_type == "fused":
            layers = [_Attention(channels, heads, cond_dim, use_self=True, use_text=True)]
        elif attention_type == "self":
            layers = [_Attention(channels, heads, cond_dim, use_self=True, use_text=False)]
        elif attention_type == "cross":
            layers = [_Attention(channels, heads, cond_dim, use_self=False, use_text=True)]
        elif attention_type == "self_cross":
            layers = [_Attention(channels, heads, cond_dim, use_self=True, use_text=False),
                      _Attention(channels, heads, cond_dim, use_self=False, use_text=True)]
        else:
            raise ValueError(f"unknown attention type {attention_type!r}")
        self.layers = nn.ModuleList(layers)

    def forward(self, x, emb, context, context_mask):
        for layer in self.layers:
            x = layer(x, context, context_mask)
        return x
