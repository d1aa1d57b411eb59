"""Glue shared by both UNets: a sequence of blocks, per-block activation checkpointing, SR input."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


class Stage(nn.ModuleList):
    """Blocks run in order; each takes (x, emb, context, context_mask)."""

    def forward(self, x, emb, context, context_mask):
        for block in self:
            x = block(x, emb, context, context_mask)
        return x


def run(block: nn.Module, use_checkpoint: bool, x, emb, context, context_mask):
    """Call a block, recomputing its activations in backward when checkpointing is on."""
    if use_checkpoint and torch.is_grad_enabled():
        return checkpoint(block, x, emb, context, context_mask, use_reentrant=False)
    return block(x, emb, context, context_mask)


def concat_lowres(x: torch.Tensor, lowres: Optional[torch.Tensor]) -> torch.Tensor:
    """SR input: the low-res image up-sampled (bicubic) to x's size, concatenated as channels."""
    if lowres is None:
        raise ValueError("super-resolution model needs lowres")
    if lowres.shape[-2:] != x.shape[-2:]:
        lowres = F.interpolate(lowres.float(), size=x.shape[-2:], mode="bicubic", align_corners=False)
    return torch.cat([x, lowres.to(x.dtype)], dim=1)                      # [B, 2*3, H, W]
