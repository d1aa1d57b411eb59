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


class NonFiniteGuard(torch.optim.Optimizer):
    """Wraps an optimizer: clip by global norm, and skip the update when that norm is not finite.

    DeepSpeed's ZeRO and BF16 optimizers do both themselves; a plain fp32 optimizer without ZeRO
    (one rank, `ds_config.single_rank_stage`) would otherwise apply a NaN update. DeepSpeed reads
    `overflow` (skip the step and the lr schedule) and `_global_grad_norm` (logged) from it.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, max_norm: float):
        super().__init__(optimizer.param_groups, optimizer.defaults)
        # share, not copy: the scheduler's lr and the checkpointed state are the wrapped optimizer's
        self.optimizer, self.param_groups, self.state = optimizer, optimizer.param_groups, optimizer.state
        self.max_norm = max_norm
        self.overflow = False
        self._global_grad_norm = None

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        self._global_grad_norm = norm
        self.overflow = not bool(torch.isfinite(norm))  # the step's one host sync, as in ZeRO's check
        if self.overflow:
            self.optimizer.zero_grad(set_to_none=True)
            return None
        if self.max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, self.max_norm, norm, foreach=True)
        return self.optimizer.step(closure)

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict):
        self.optimizer.load_state_dict(state_dict)
        self.param_groups, self.state = self.optimizer.param_groups, self.optimizer.state
