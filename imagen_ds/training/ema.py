"""Exponential moving average of the full weights, in fp32, on every rank.

ZeRO-2 keeps the full (bf16) parameters on every rank, so each rank can average them itself:
no gather, and every rank ends with the same EMA (its inputs are identical after each step).
The average is taken of the module's parameters right after an optimizer step, i.e. only at
accumulation boundaries; mid-accumulation calls would average the same weights twice.
"""
from __future__ import annotations

import torch


def ema_decay(decay: float, num_updates: int, warmup: bool) -> float:
    """Decay for the next update; with warm-up min(decay, (1 + n) / (10 + n)) so early EMA tracks."""
    if warmup:
        return min(decay, (1.0 + num_updates) / (10.0 + num_updates))
    return decay


class EMA:
    def __init__(self, module: torch.nn.Module, decay: float, warmup: bool = False, device: str | None = None):
        self.decay, self.warmup = decay, warmup
        self.num_updates = 0
        self.device = device
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().to(device=device or p.device, dtype=torch.float32, copy=True)
            for name, p in module.named_parameters()
        }

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        """shadow <- d * shadow + (1 - d) * weights. Call once per optimizer step, after it."""
        d = ema_decay(self.decay, self.num_updates, self.warmup)
        names = list(self.shadow)
        params = dict(module.named_parameters())
        shadows = [self.shadow[n] for n in names]
        current = [params[n].detach().to(device=s.device, dtype=torch.float32) for n, s in zip(names, shadows)]
        torch._foreach_lerp_(shadows, current, 1.0 - d)
        self.num_updates += 1

    def state_dict(self) -> dict:
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates,
                "shadow": {k: v.detach().cpu() for k, v in self.shadow.items()}}

    def load_state_dict(self, sd: dict) -> None:
        self.num_updates = int(sd["num_updates"])
        missing = set(self.shadow) - set(sd["shadow"])
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:3]}...")
        for k, v in sd["shadow"].items():
            self.shadow[k].copy_(v)

    def copy_to(self, module: torch.nn.Module) -> None:
        """Write the averaged weights into `module` (e.g. a fresh fp32 model for sampling)."""
        with torch.no_grad():
            for name, p in module.named_parameters():
                p.copy_(self.shadow[name].to(p.dtype))
