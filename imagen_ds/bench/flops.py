"""Training FLOPs of a config, counted by torch's FlopCounterMode on the meta device.

Meta tensors carry shapes but no data, so even the 2B model is counted in seconds with no
memory. The count covers matmuls, convolutions and attention (what MFU is measured
against); norms and pointwise ops are ignored, and activation-checkpoint recomputation is
left out (model FLOPs, not hardware FLOPs).
"""
from __future__ import annotations

import dataclasses

import torch
from torch.utils.flop_counter import FlopCounterMode

from imagen_ds.config import ImagenConfig


def train_sample_shapes(cfg: ImagenConfig) -> tuple[int, int | None]:
    """(side of the training image, side of its low-res image or None) for one sample."""
    m = cfg.model
    side = cfg.data.train_crop or m.resolution
    return side, (side * m.lowres_resolution // m.resolution if m.is_sr else None)


def dummy_inputs(cfg: ImagenConfig, batch: int, device: str | torch.device | None = None) -> dict:
    """Network inputs of the training shapes (all text tokens valid: the flash-kernel case)."""
    side, low = train_sample_shapes(cfg)
    inputs = {
        "x": torch.randn(batch, cfg.model.in_channels, side, side, device=device),
        "noise_cond": torch.zeros(batch, device=device),
        "text_emb": torch.randn(batch, cfg.text.max_tokens, cfg.text.dim, device=device),
        "text_mask": torch.ones(batch, cfg.text.max_tokens, dtype=torch.bool, device=device),
    }
    if low is not None:
        inputs["lowres"] = torch.randn(batch, cfg.model.in_channels, low, low, device=device)
        inputs["aug_level"] = torch.zeros(batch, device=device)
    return inputs


def train_flops_per_sample(cfg: ImagenConfig, batch: int = 1) -> int:
    """Forward + backward FLOPs of one training sample (multiply-add = 2 FLOPs).

    Always on the meta device: there SDPA decomposes into counted matmuls, while CPU's fused
    attention kernel is invisible to FlopCounterMode.
    """
    from imagen_ds.models import build_model

    # no recomputation in the count
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, checkpoint_activations=False))
    with torch.device("meta"):
        net = build_model(cfg)
        inputs = dummy_inputs(cfg, batch)
    with FlopCounterMode(display=False) as counter:
        net(**inputs).sum().backward()
    return counter.get_total_flops() // batch
