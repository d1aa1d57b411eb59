"""Synthetic training batches of the right shapes: benchmarks time the model, not the loader."""
from __future__ import annotations

import torch

from imagen_ds.config import ImagenConfig


def train_sides(cfg: ImagenConfig) -> tuple[int, int | None]:
    """(side of the training image, side of its low-res image or None), as the loader makes them."""
    m = cfg.model
    side = cfg.data.train_crop or m.resolution
    low = side * m.lowres_resolution // m.resolution if m.is_sr else None
    return side, low


def synthetic_batch(cfg: ImagenConfig, batch_size: int, device: torch.device | str = "cpu",
                    seed: int = 0) -> dict:
    """One loader-shaped batch: images in [-1, 1], T5-like embeddings, captions of mixed lengths.

    Text masks are partly padded as real captions are (a mask changes which attention kernel
    runs); lengths are drawn between 8 tokens and the maximum.
    """
    g = torch.Generator().manual_seed(seed)
    side, low = train_sides(cfg)
    t, d = cfg.text.max_tokens, cfg.text.dim
    lengths = torch.randint(min(8, t), t + 1, (batch_size,), generator=g)
    batch = {
        "image": torch.rand(batch_size, 3, side, side, generator=g) * 2 - 1,       # [B, 3, S, S]
        "text_emb": torch.randn(batch_size, t, d, generator=g) * 0.2,              # [B, T, D]
        "text_mask": torch.arange(t)[None, :] < lengths[:, None],                  # [B, T]
    }
    if low is not None:
        batch["lowres"] = torch.rand(batch_size, 3, low, low, generator=g) * 2 - 1  # [B, 3, s, s]
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["caption"] = ["synthetic"] * batch_size
    return batch


def repeat(batch: dict):
    """An endless iterator over the same batch (what train_step reads micro-batches from)."""
    while True:
        yield batch
