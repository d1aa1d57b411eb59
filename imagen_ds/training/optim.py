"""AdamW (the fastest implementation available) and the learning-rate schedule."""
from __future__ import annotations

import math

import torch

from imagen_ds.config import TrainingConfig


def make_optimizer(params, tr: TrainingConfig) -> tuple[torch.optim.Optimizer, str]:
    """Apex FusedAdam if importable > DeepSpeed FusedAdam on CUDA > torch AdamW (fused/foreach).

    Returns the optimizer and a name for the run log. All are AdamW: decoupled weight decay.
    """
    params = [p for p in params if p.requires_grad]
    kw = dict(lr=tr.lr, betas=tuple(tr.betas), eps=tr.eps, weight_decay=tr.weight_decay)
    if torch.cuda.is_available():
        try:
            from apex.optimizers import FusedAdam as ApexFusedAdam

            return ApexFusedAdam(params, adam_w_mode=True, **kw), "apex.optimizers.FusedAdam"
        except ImportError:
            pass
        try:
            from deepspeed.ops.adam import FusedAdam

            return FusedAdam(params, adam_w_mode=True, **kw), "deepspeed.ops.adam.FusedAdam"
        except Exception:  # op build failure (no nvcc): fall back to torch
            pass
    try:
        return torch.optim.AdamW(params, fused=True, **kw), "torch.optim.AdamW(fused=True)"
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, foreach=True, **kw), "torch.optim.AdamW(foreach=True)"


def lr_factor(step: int, warmup_steps: int, schedule: str, total_steps: int) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based).

    Linear warm-up (step + 1) / warmup, so the first step already moves the weights; then
    constant, or cosine from 1 to 0 over the remaining steps.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "cosine":
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def make_scheduler(optimizer: torch.optim.Optimizer, tr: TrainingConfig, total_steps: int):
    def factor(step: int) -> float:
        return lr_factor(step, tr.warmup_steps, tr.lr_schedule, total_steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
