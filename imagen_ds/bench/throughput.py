"""`imagen-ds benchmark-throughput`: training speed of the real engine, and of a bare PyTorch loop.

The engine step is what `train` runs per optimizer step (training.engine.train_step, then the
EMA update), on one synthetic batch of the right shapes, so the loader is out of the picture.
The bare baseline is the same model and batch in a plain PyTorch loop doing the same math:
forward, backward, gradient clipping (foreach norm), fused AdamW, EMA update, with the same
precision (fp32 weights under bf16 autocast for bf16 configs, as torch AMP does it). So
overhead_vs_bare is what the engine's machinery (DeepSpeed's ZeRO hooks, buckets, copies,
its clipping) costs on top of the arithmetic every trainer must do.
Engine and bare steps alternate, one each, so that load from other processes on a shared
machine hits both alike; overhead_vs_bare is the median of the per-pair time ratios.
When both do not fit in the device memory at once (big models on one GPU), the bare loop runs
after the engine is freed ("sequential").
"""
from __future__ import annotations

import contextlib
import gc
import os
import statistics
import sys
import time
from typing import Callable, Optional

import torch

from imagen_ds.bench.synthetic import repeat, synthetic_batch
from imagen_ds.config import ImagenConfig, load_config

# dense bf16 tensor-core peak (TFLOP/s) by device name, vendor datasheets
PEAK_TFLOPS = (("H200", 989.0), ("H100", 989.0), ("A100", 312.0))

SDPA_KERNELS = ("flash_attention", "efficient_attention", "cudnn_attention", "_scaled_dot_product_attention_math",
                "scaled_dot_product_flash_attention_for_cpu", "fused_attention_overrideable")


def device_peak_tflops(device: torch.device) -> Optional[float]:
    """Dense bf16 peak of a known GPU, None on CPU or an unknown device."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_TFLOPS:
        if key in name:
            return peak
    return None


def flops_per_sample(cfg: ImagenConfig) -> Optional[float]:
    """Training FLOPs per sample (forward + backward, multiply-add = 2) counted by bench.flops."""
    try:
        from imagen_ds.bench.flops import train_flops_per_sample

        return float(train_flops_per_sample(cfg))
    except ImportError:
        return None


@contextlib.contextmanager
def stdout_to_stderr():
    """Send everything written to fd 1 (DeepSpeed's logger, op builds) to stderr, so that
    `--json` prints one clean object on stdout."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], None], device: torch.device) -> float:
    """Wall time of fn with the device drained before and after (no queued work is counted twice)."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _spread(times: list[float]) -> dict:
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {"median": statistics.median(times), "min": min(times), "max": max(times),
            "iqr": q[2] - q[0], "n": len(times)}


def benchmark_config(cfg: ImagenConfig, micro_batch: Optional[int] = None, world: int = 1) -> ImagenConfig:
    """One micro-batch per optimizer step (accumulation 1): the step time is per micro-batch."""
    mb = micro_batch or cfg.training.micro_batch
    return cfg.replace(training={"micro_batch": mb, "global_batch": mb * world})


def _build_net(cfg: ImagenConfig, device: torch.device, seed: int) -> torch.nn.Module:
    """Initialise directly on the device: a 2B model's init on the host would dominate a GPU check."""
    from imagen_ds.models import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device):
            return build_model(cfg)


class BareLoop:
    """The baseline: the same step in plain PyTorch (forward, backward, clip, AdamW, EMA)."""

    INCLUDES = ["forward", "backward", "clip_grad_norm_(foreach)", "AdamW(fused)", "EMA update"]

    def __init__(self, cfg: ImagenConfig, diffusion, batch: dict, device: torch.device, compile: bool, seed: int):
        from imagen_ds.training.ema import EMA
        from imagen_ds.training.engine import autocast_for

        self.cfg, self.diffusion, self.batch = cfg, diffusion, batch
        self.net = _build_net(cfg, device, seed)
        if compile:
            self.net.compile()
        tr = cfg.training
        self.params = list(self.net.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=tr.lr, betas=tuple(tr.betas), eps=tr.eps,
                                     weight_decay=tr.weight_decay, fused=True)
        self.ema = EMA(self.net, tr.ema_decay, tr.ema_warmup, device="cpu" if tr.ema_on_cpu else None)
        self.autocast = lambda: autocast_for(cfg, device)

    def step(self) -> None:
        b, clip = self.batch, self.cfg.training.grad_clip
        self.opt.zero_grad(set_to_none=True)
        with self.autocast():
            loss = self.diffusion.training_loss(self.net, b["image"], b["text_emb"], b["text_mask"],
                                                lowres=b.get("lowres")).float().mean()
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, clip, foreach=True)
        self.opt.step()
        self.ema.update(self.net)


def _try_bare(cfg, diffusion, batch, device, compile, seed, warmup) -> Optional[BareLoop]:
    """The bare loop, warmed up; None when it does not fit in the device memory."""
    try:
        loop = BareLoop(cfg, diffusion, batch, device, compile, seed)
        for _ in range(max(1, warmup)):
            loop.step()
        return loop
    except torch.OutOfMemoryError:
        return None


def attention_kernels(step: Callable[[], None]) -> list[str]:
    """The scaled-dot-product-attention kernels one step dispatches to, read off the profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    names = {e.key for e in prof.key_averages()}
    return sorted(n for n in names if any(k in n for k in SDPA_KERNELS))


def _free_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def benchmark(model: str | ImagenConfig, *, micro_batch: Optional[int] = None, steps: int = 10, warmup: int = 3,
              ds_config: Optional[str] = None, compile: bool = False, peak_tflops: Optional[float] = None,
              gpu_mem_cap: Optional[float] = None, bare: bool = True, seed: int = 0,
              threads: Optional[int] = None) -> dict:
    """Time `steps` engine steps (and as many bare steps) after `warmup` of each; returns the report dict."""
    from imagen_ds.diffusion import build_diffusion
    from imagen_ds.training.dist_env import init_distributed, setup_env
    from imagen_ds.training.ema import EMA
    from imagen_ds.training.engine import build_engine, train_step

    if steps < 1:
        from imagen_ds.errors import ConfigError

        raise ConfigError("--steps", str(steps), "needs at least 1 timed step")
    cfg = load_config(model) if isinstance(model, str) else model
    if threads:
        torch.set_num_threads(threads)  # a shared CPU: more threads than free cores stall at every barrier
    env = setup_env()
    init_distributed(env)
    device = torch.device("cuda", env.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda" and gpu_mem_cap:
        total = torch.cuda.get_device_properties(device).total_memory
        # stand in for a smaller card: the caching allocator refuses to grow past the cap
        torch.cuda.set_per_process_memory_fraction(min(1.0, gpu_mem_cap * 2**30 / total), device)
    cfg = benchmark_config(cfg, micro_batch, env.world_size)
    torch.manual_seed(seed)

    # ---- the engine, exactly as `train` builds and steps it
    net = _build_net(cfg, device, seed)
    if compile:
        net.compile()  # in place: parameter names (EMA, checkpoints) stay as they are
    built = build_engine(cfg, ds_config=ds_config, model=net, steps=10**6, seed=seed)
    cfg, engine = built.cfg, built.engine
    ema = EMA(engine.module, cfg.training.ema_decay, cfg.training.ema_warmup,
              device="cpu" if cfg.training.ema_on_cpu else None)
    diffusion = build_diffusion(cfg)
    batch = synthetic_batch(cfg, cfg.training.micro_batch, device, seed=seed)
    batches = repeat(batch)

    def engine_step() -> None:
        res = train_step(built, diffusion, batches)
        if res.applied:
            ema.update(engine.module)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(max(1, warmup)):
        engine_step()
    _sync(device)
    # the engine's own peak, before a bare model shares the device
    if device.type == "cuda":
        peak_alloc = torch.cuda.max_memory_allocated(device) / 2**30
        peak_reserved = torch.cuda.max_memory_reserved(device) / 2**30
        mem_kind = "torch.cuda.max_memory_allocated / max_memory_reserved"
    else:
        import resource

        peak_alloc, peak_reserved = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, None
        mem_kind = "process peak RSS (CPU)"

    # ---- the bare loop beside it when it fits, else after the engine is freed
    bare_loop, mode = None, None
    if bare:
        bare_loop = _try_bare(cfg, diffusion, batch, device, compile, seed, warmup)
        mode = "interleaved" if bare_loop else "sequential"
        _free_device_memory(device)  # after the except block: its traceback held the failed attempt

    t_engine, t_bare = [], []
    for _ in range(steps):
        t_engine.append(timed(engine_step, device))
        if mode == "interleaved":
            t_bare.append(timed(bare_loop.step, device))
    kernels = attention_kernels(engine_step)

    bare_note, optimizer_name = None, built.optimizer_name
    if mode == "sequential":
        del engine, built, ema, net
        _free_device_memory(device)
        bare_loop = _try_bare(cfg, diffusion, batch, device, compile, seed, warmup)
        if bare_loop:
            t_bare = [timed(bare_loop.step, device) for _ in range(steps)]
        else:
            bare_note = "bare loop did not fit in device memory, even alone"
    del bare_loop
    _free_device_memory(device)

    mb, world = cfg.training.micro_batch, env.world_size
    e = _spread(t_engine)
    samples_per_s = mb * world / e["median"]
    fps = flops_per_sample(cfg)
    tflops = fps * mb / e["median"] / 1e12 if fps else None  # per device
    peak = peak_tflops if peak_tflops else device_peak_tflops(device)
    report = {
        "model": cfg.name, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "world_size": world, "micro_batch": mb, "steps": steps, "warmup": warmup,
        "samples_per_s": samples_per_s, "step_time_s": e,
        "train_flops_per_sample": fps, "tflops": tflops, "peak_tflops": peak,
        "mfu": tflops / peak if (tflops and peak) else None,
        "peak_mem_gb": peak_alloc, "peak_reserved_gb": peak_reserved, "peak_mem_method": mem_kind,
        "gpu_mem_cap_gb": gpu_mem_cap if device.type == "cuda" else None,
        "precision": cfg.training.precision, "zero_stage": cfg.training.zero_stage,
        "optimizer": optimizer_name,
        "attention_kernels": kernels, "checkpoint_activations": cfg.model.checkpoint_activations,
        "compile": compile, "ds_config": ds_config if isinstance(ds_config, str) else ("custom" if ds_config else "default"),
        "cpu_threads": torch.get_num_threads(),
        "bare": None, "overhead_vs_bare": None,
        "versions": {"torch": torch.__version__, "deepspeed": _version("deepspeed"),
                     "cuda": torch.version.cuda},
    }
    if t_bare:
        b = _spread(t_bare)
        if mode == "interleaved":
            overhead = statistics.median(te / tb for te, tb in zip(t_engine, t_bare))
        else:
            overhead = e["median"] / b["median"]
        report["bare"] = {"mode": mode, "step_time_s": b, "samples_per_s": mb * world / b["median"],
                          "tflops": fps * mb / b["median"] / 1e12 if fps else None,
                          "optimizer": "torch.optim.AdamW(fused=True)", "includes": BareLoop.INCLUDES}
        report["overhead_vs_bare"] = overhead
    elif bare_note:
        report["bare"] = {"mode": mode, "note": bare_note}
    return report


def _version(pkg: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(pkg)
    except Exception:
        return None


def format_report(r: dict) -> str:
    def num(x, fmt):
        return "n/a" if x is None else format(x, fmt)

    st = r["step_time_s"]
    lines = [
        f"{r['model']} on {r['device']}: micro-batch {r['micro_batch']} x {r['world_size']} rank(s), "
        f"{r['precision']}, ZeRO-{r['zero_stage']}, checkpointing {'on' if r['checkpoint_activations'] else 'off'}"
        f"{', torch.compile' if r['compile'] else ''}",
        f"  samples/s      {r['samples_per_s']:.2f}",
        f"  step time      median {st['median'] * 1e3:.1f} ms (min {st['min'] * 1e3:.1f}, max {st['max'] * 1e3:.1f}, "
        f"IQR {st['iqr'] * 1e3:.1f}; {st['n']} steps)",
        f"  TFLOP/s        {num(r['tflops'], '.3f')}  (train FLOPs/sample {num(r['train_flops_per_sample'], '.3e')})",
        f"  MFU            {num(r['mfu'], '.1%')}  (peak {num(r['peak_tflops'], '.0f')} TFLOP/s)",
        f"  peak memory    {r['peak_mem_gb']:.2f} GiB allocated, {num(r['peak_reserved_gb'], '.2f')} GiB reserved "
        f"[{r['peak_mem_method']}]",
        f"  attention      {', '.join(r['attention_kernels']) or 'none'}",
        f"  optimizer      {r['optimizer']}",
    ]
    b = r.get("bare")
    if b and "step_time_s" in b:
        lines.append(f"  bare loop      median {b['step_time_s']['median'] * 1e3:.1f} ms ({b['mode']}); "
                     f"overhead_vs_bare {r['overhead_vs_bare']:.3f}")
    elif b:
        lines.append(f"  bare loop      {b['note']}")
    return "\n".join(lines)
