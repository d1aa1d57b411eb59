"""Build the DeepSpeed engine for a config, and run one optimizer step on it.

`build_engine` and `train_step` are the two pieces the trainer, the throughput benchmark and
the demo share, so what is timed is what trains.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from imagen_ds.config import ImagenConfig
from imagen_ds.training.ds_config import build_ds_config
from imagen_ds.training.optim import NonFiniteGuard, make_optimizer, make_scheduler

log = logging.getLogger("imagen_ds.training")


@dataclass
class BuiltEngine:
    engine: Any               # deepspeed.DeepSpeedEngine; engine.module is the network
    cfg: ImagenConfig         # resolved: precision / ZeRO stage / clip as DeepSpeed runs them
    ds_config: dict           # the exact DeepSpeed config dict
    optimizer_name: str       # which AdamW implementation was picked
    accumulation: int         # micro-batches per optimizer step on each rank
    world_size: int

    @property
    def device(self) -> torch.device:
        return self.engine.device


def total_steps(cfg: ImagenConfig) -> int:
    """Training length in optimizer steps: samples / global batch, rounded up."""
    return -(-cfg.training.samples // cfg.training.global_batch)


def build_engine(cfg: ImagenConfig, *, ds_config: str | Path | dict | None = None, model=None,
                 steps: int | None = None, seed: int = 0, extra_ds: dict | None = None) -> BuiltEngine:
    """DeepSpeed engine (ZeRO, bf16/fp32, AdamW, warm-up schedule) around build_model(cfg).

    Needs torch.distributed initialised (`dist_env.init_distributed`). The model is built from
    `seed` on every rank (identical weights; DeepSpeed also broadcasts rank 0's). `steps`: the
    training length the cosine schedule spans (default: cfg.training.samples / global batch).
    """
    import deepspeed
    import torch.distributed as dist

    world = dist.get_world_size()
    ds, cfg = build_ds_config(cfg, world, ds_config)
    if extra_ds:
        ds = {**ds, **extra_ds}
    if model is None:
        from imagen_ds.models import build_model

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_model(cfg)
    optimizer, scheduler, opt_name = None, None, "DeepSpeed optimizer block"
    if "optimizer" not in ds:
        optimizer, opt_name = make_optimizer(model.parameters(), cfg.training)
        if cfg.training.zero_stage == 0 and cfg.training.precision == "fp32":
            # no ZeRO / BF16 optimizer to skip non-finite steps: the guard skips them and clips
            # (DeepSpeed's own clip would compute the same norm a second time)
            optimizer = NonFiniteGuard(optimizer, cfg.training.grad_clip)
            ds["gradient_clipping"] = 0.0
            opt_name += " (clip + skip non-finite)"
        if "scheduler" not in ds:
            scheduler = make_scheduler(optimizer, cfg.training, steps or total_steps(cfg))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           model_parameters=None if optimizer else model.parameters(),
                                           config=ds)
    if world == 1 and cfg.training.zero_stage == 0:
        engine.enable_backward_allreduce = False  # an all-reduce over one rank only copies buffers
    accum = engine.gradient_accumulation_steps()
    if dist.get_rank() == 0:
        log.info("engine: ZeRO-%d %s, optimizer %s, micro %d x accumulation %d x world %d = %d",
                 cfg.training.zero_stage, cfg.training.precision, opt_name, cfg.training.micro_batch,
                 accum, world, engine.train_batch_size())
    return BuiltEngine(engine, cfg, ds, opt_name, accum, world)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def autocast_for(cfg: ImagenConfig, device: torch.device):
    """bf16 autocast: DeepSpeed holds bf16 weights while the diffusion code feeds fp32 tensors."""
    if cfg.training.precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class StepResult:
    loss: torch.Tensor      # [] this rank's mean per-sample loss over the step (on device, no sync)
    data_wait: float        # seconds spent waiting for batches
    applied: bool           # False: DeepSpeed skipped the update (non-finite gradients)
    micro_batches: int


def train_step(built: BuiltEngine, diffusion, batches: Iterator[dict]) -> StepResult:
    """One optimizer step: `accumulation` micro-batches of forward, backward, then the update.

    `batches` yields loader dicts ("image", "text_emb", "text_mask", SR: "lowres"). The loss is
    returned as a device tensor: no host sync here (DeepSpeed's own clip/overflow check syncs once).
    """
    engine = built.engine
    device = engine.device
    loss_sum = torch.zeros((), device=device)
    data_wait = 0.0
    for _ in range(built.accumulation):
        t0 = time.perf_counter()
        batch = to_device(next(batches), device)
        data_wait += time.perf_counter() - t0
        with autocast_for(built.cfg, device):
            per_sample = diffusion.training_loss(engine, batch["image"], batch["text_emb"], batch["text_mask"],
                                                 lowres=batch.get("lowres"))  # [B] fp32
        loss = per_sample.float().mean()
        engine.backward(loss)
        engine.step()  # a no-op except at the accumulation boundary
        loss_sum += loss.detach()
    return StepResult(loss_sum / built.accumulation, data_wait, engine.was_step_applied(), built.accumulation)
