"""The training loop: one function, read top to bottom (like nanoGPT's / EDM's).

batch -> diffusion.training_loss -> engine.backward -> engine.step -> EMA (at accumulation
boundaries) -> log -> checkpoint. Runs identically on 1 CPU process or many GPUs.
"""
from __future__ import annotations

import itertools
import math
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from imagen_ds.config import ImagenConfig
from imagen_ds.errors import ConfigError
from imagen_ds.training import checkpoint as ckpt
from imagen_ds.training.ds_config import grad_accumulation
from imagen_ds.training.dist_env import init_distributed, setup_env
from imagen_ds.training.ema import EMA
from imagen_ds.training.engine import build_engine, train_step
from imagen_ds.training.logging import MetricsLogger, log, peak_memory_gb, setup_console
from imagen_ds.training.run_info import write_run_info


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. K non-finite losses in a row); the message says why."""


@dataclass
class TrainState:
    step: int = 0            # optimizer steps taken, skipped ones included
    samples_seen: int = 0    # over all ranks
    micro_batches: int = 0   # batches each rank drew from its loader (its resume position)
    skipped_steps: int = 0   # steps whose update was dropped for non-finite gradients
    bad_in_row: int = 0


class _StopFlag:
    """SIGTERM / SIGINT ask for a checkpoint and a clean exit at the end of the current step."""

    def __init__(self):
        self.requested = None
        self._old = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a notebook worker)
                pass

    def _handle(self, signum, frame) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.requested = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _any_rank(flag: bool, device: torch.device) -> bool:
    import torch.distributed as dist

    if dist.get_world_size() == 1:
        return flag  # no collective (and no device sync) per step for a single process
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _mean_over_ranks(value: torch.Tensor) -> float:
    import torch.distributed as dist

    t = value.detach().float().reshape(1).clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / dist.get_world_size()).item()


def _make_batches(data, cfg: ImagenConfig, *, rank: int, world: int, seed: int, skip: int):
    """Shards (dir / glob / brace pattern / list of .tar) -> the data loader; a callable taking
    the loader's keyword arguments -> its result; any other iterable of batch dicts -> itself.

    Returns (batch iterator, the object that counts skipped samples or None)."""
    kw = dict(micro_batch=cfg.training.micro_batch, rank=rank, world_size=world, seed=seed, skip_batches=skip)
    if isinstance(data, (str, Path)) or (isinstance(data, (list, tuple)) and data and isinstance(data[0], (str, Path))):
        from imagen_ds.data import make_train_loader

        loader = make_train_loader(cfg, data, **kw)
        return iter(loader), loader
    source = data(**kw) if callable(data) else data
    return iter(source), (source if hasattr(source, "skipped") else None)


def _data_counts(loader) -> dict:
    """This rank's loader counts for the metrics: samples read, and skipped (bad) ones by reason."""
    if loader is None:
        return {}
    skipped = loader.skipped
    return {"data_seen": loader.seen, "data_skipped": sum(skipped.values()),
            **{f"data_skipped/{reason}": n for reason, n in sorted(skipped.items())}}


def flops_per_sample(cfg: ImagenConfig) -> float | None:
    """Training FLOPs per sample from the benchmark module, if it can count this config."""
    try:
        from imagen_ds.bench.flops import train_flops_per_sample

        return float(train_flops_per_sample(cfg))
    except Exception as e:  # counting is optional: the status line then shows no TFLOP/s
        log.info("no FLOP count for %s (%s)", cfg.name, e)
        return None


def train(cfg: ImagenConfig, data: Any, out: str | Path, *, steps: int | None = None, samples: int | None = None,
          resume: bool = False, ds_config: str | Path | dict | None = None, seed: int = 0,
          use_wandb: bool = False, log_every: int | None = None, save_every: int | None = None,
          local_rank: int | None = None) -> dict:
    """Train `cfg` on `data`, writing logs and checkpoints to `out`. Returns a summary dict.

    steps / samples: training length (default cfg.training.samples); resume: continue from the
    latest complete checkpoint in `out` (starts fresh when there is none). Every rank calls this.
    """
    env = setup_env(local_rank)
    grad_accumulation(cfg.training.global_batch, cfg.training.micro_batch, env.world_size, cfg.source)  # fail early
    init_distributed(env)
    rank, world = env.rank, env.world_size
    setup_console(rank)
    out, tr = Path(out), cfg.training
    ckpt_dir = out / "checkpoints"
    log_every = log_every or tr.log_every
    save_every = save_every or tr.save_every
    if steps is None:
        steps = -(-(samples or tr.samples) // tr.global_batch)

    tag = ckpt.latest_tag(ckpt_dir) if resume else None
    if not resume and ckpt.complete_tags(ckpt_dir):
        raise ConfigError("--out", str(out), "already holds checkpoints; pass --resume to continue or pick a new --out")
    if tag is not None:
        saved = ckpt.read_meta(ckpt_dir, tag)["config"]
        if saved["model"] != cfg.to_dict()["model"]:
            raise ConfigError(str(ckpt_dir / tag), "model", "the checkpoint was trained with a different model "
                                                            "section than --model gives")

    # weights from `seed` on every rank; then each rank its own noise stream
    ckpt.seed_everything(seed)
    built = build_engine(cfg, ds_config=ds_config, steps=steps, seed=seed)
    cfg, engine, device = built.cfg, built.engine, built.device
    ema = EMA(engine.module, tr.ema_decay, tr.ema_warmup, device="cpu" if tr.ema_on_cpu else None)

    state = TrainState()
    same_world, rng = True, None
    if tag is not None:
        meta, rng = ckpt.load(engine, ckpt_dir, tag, ema)
        state = TrainState(**{k: meta[k] for k in asdict(state)})
        same_world = meta["world_size"] == world
        log.info("resumed from %s (step %d, %d samples seen)", ckpt_dir / tag, state.step, state.samples_seen)
    elif resume:
        log.info("no checkpoint in %s: starting from scratch", ckpt_dir)
    if rank == 0:
        write_run_info(out, cfg, built.ds_config, seed=seed, world_size=world, launcher=env.launcher,
                       optimizer=built.optimizer_name, resumed_from=str(ckpt_dir / tag) if tag else None,
                       extra={"steps": steps, "accumulation": built.accumulation})

    # the loader position: exact on the same world size, else restart the stream past the seen samples
    data_seed = seed if same_world else seed + state.step
    skip = state.micro_batches if same_world else 0
    batches, loader = _make_batches(data, cfg, rank=rank, world=world, seed=data_seed, skip=skip)
    if not same_world:
        state.micro_batches = 0

    from imagen_ds.diffusion import build_diffusion

    diffusion = build_diffusion(cfg)
    logger = MetricsLogger(out, rank, resume_step=state.step, use_wandb=use_wandb, cfg=cfg, total_steps=steps)
    flops = flops_per_sample(cfg)
    sampler = None
    if tr.sample_every > 0 and rank == 0:
        from imagen_ds.training.samples import SampleGrid

        sampler = SampleGrid(cfg, diffusion, out / "samples", device)
        first = next(batches)  # fixed prompts: the start of rank 0's first batch
        sampler.remember(first)
        batches = itertools.chain([first], batches)
    stop = _StopFlag()
    stop.install()

    # each rank its own noise stream; set last, so nothing above (W&B, the sampler) shifts it
    if rng is not None:
        ckpt.set_rng_state(rng)
    else:
        ckpt.seed_everything(seed + rank + 1_000_003 * state.step)
    last_saved = tag
    loss_acc, n_loss, n_steps, wait_acc = torch.zeros((), device=device), 0, 0, 0.0
    t_last = time.perf_counter()
    try:
        while state.step < steps:
            # ---- one optimizer step: accumulation x (forward, backward), then the update
            lr = engine.get_lr()[0]  # the rate this step uses (the scheduler moves after it)
            res = train_step(built, diffusion, batches)
            state.step += 1
            state.samples_seen += tr.global_batch
            state.micro_batches += res.micro_batches
            n_steps += 1
            wait_acc += res.data_wait

            # ---- EMA only after an applied update (i.e. at the accumulation boundary)
            if res.applied:
                ema.update(engine.module)
                loss_acc += res.loss
                n_loss += 1
                state.bad_in_row = 0
            else:
                state.skipped_steps += 1
                state.bad_in_row += 1
                log.warning("step %d: non-finite loss/gradients, update skipped (%d in a row)",
                            state.step, state.bad_in_row)

            # ---- log (the only host syncs besides DeepSpeed's own clip/overflow check)
            if state.step % log_every == 0 or state.step == steps:
                loss = _mean_over_ranks(loss_acc / max(n_loss, 1)) if n_loss else math.nan
                elapsed = time.perf_counter() - t_last
                gnorm = engine.get_global_grad_norm()
                metrics = {
                    "step": state.step, "loss": loss, "lr": lr,
                    "grad_norm": float(gnorm) if gnorm is not None else None,
                    "samples_seen": state.samples_seen,
                    "samples_per_s": n_steps * tr.global_batch / elapsed,
                    "step_time": elapsed / n_steps, "data_wait": wait_acc / n_steps,
                    "peak_mem_gb": peak_memory_gb(device), "skipped_steps": state.skipped_steps,
                    **_data_counts(loader),
                }
                if flops:
                    metrics["tflops"] = flops * metrics["samples_per_s"] / world / 1e12  # per rank
                logger.log(metrics)
                loss_acc.zero_()
                n_loss, n_steps, wait_acc, t_last = 0, 0, 0.0, time.perf_counter()

            if state.bad_in_row >= tr.max_bad_steps:
                raise TrainingStopped(
                    f"{state.bad_in_row} steps in a row had a non-finite loss or gradients (training.max_bad_steps="
                    f"{tr.max_bad_steps}); stopped at step {state.step}. The last good checkpoint is "
                    f"{ckpt_dir / last_saved if last_saved else 'none (no checkpoint saved yet)'}; lower "
                    f"training.lr or check the data, then resume with --resume")

            # ---- checkpoint: periodic, at the end, or when asked to stop
            stopping = _any_rank(stop.requested is not None, device)
            if stopping or state.step % save_every == 0 or state.step == steps:
                meta = {**asdict(state), "world_size": world, "seed": seed, "steps": steps,
                        "config": cfg.to_dict()}
                t_save = time.perf_counter()
                last_saved = ckpt.save(engine, ckpt_dir, meta, ema, tr.keep_last)
                t_last += time.perf_counter() - t_save  # saving is not step time
                log.info("saved %s", ckpt_dir / last_saved)
            if stopping:
                log.info("stopped by %s at step %d; resume with --resume", stop.requested or "another rank",
                         state.step)
                break

            if sampler is not None and state.step % tr.sample_every == 0:
                t_sample = time.perf_counter()
                grid = sampler.make(ema, state.step)
                logger.log_images(state.step, grid, sampler.captions)
                t_last += time.perf_counter() - t_sample
    finally:
        stop.restore()
        logger.close()
    return {"out": str(out), "step": state.step, "samples_seen": state.samples_seen,
            "skipped_steps": state.skipped_steps, "checkpoint": str(ckpt_dir / last_saved) if last_saved else None,
            "stopped_by": stop.requested}


def run(cfg: ImagenConfig | str, data: Any, out: str | Path, **kwargs) -> dict:
    """In-process training (one rank unless launched by a distributed launcher): see `train`."""
    if isinstance(cfg, (str, Path)):
        from imagen_ds.config import load_config

        cfg = load_config(cfg)
    return train(cfg, data, out, **kwargs)
