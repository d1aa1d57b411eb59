"""`imagen-ds plan`: the largest per-GPU micro-batch that fits, and the peak memory it predicts.

peak(B) = model states (bench.memory: weights, gradients, fp32 master, Adam, EMA, ZeRO-sharded)
        + DeepSpeed's gradient buckets (ZeRO 1/2 allocate reduce_bucket_size elements in the weights'
          dtype, twice with overlap_comm, whatever the model's size)
        + activations(B) = fixed + per_sample x B

The activation line is measured, not modelled: one training micro-step (the diffusion loss
under the engine's autocast, then backward) at two small batch sizes, with the weights in the
training precision and their gradients already allocated (they are model state), each with and
without activation checkpointing. Where it is measured:
- cuda: on the GPU, torch.cuda.max_memory_allocated (kernel workspaces included);
- cpu:  small models on the CPU, the profiler's allocation events;
- fake: big models without a GPU: fake tensors (shapes only, no memory, seconds even for 2B)
        under CPU bf16 autocast, with a ledger of the tensor storages ops create and free. It
        does not see kernel workspaces (cuDNN), so it is a lower bound on the GPU's number.
Off the GPU the norm layers are made to run in fp32 under autocast, as CUDA autocast runs them
(CPU autocast does not), so cpu and fake size what a GPU stores (follow_cuda_autocast_norms).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from imagen_ds.bench.memory import GB, model_state_bytes
from imagen_ds.bench.peak_memory import StorageLedger, measure_peak_bytes
from imagen_ds.bench.synthetic import synthetic_batch
from imagen_ds.config import ImagenConfig, load_config

MEASURE_BATCHES = (1, 2)
HEADROOM = 0.05           # of GPU memory kept free for the caching allocator's fragmentation
CPU_MEASURE_MAX_FLOPS = 5e10  # above this (all measured steps together) a CPU run takes too long
DS_DEFAULT_BUCKET = 500_000_000  # DeepSpeed's reduce_bucket_size when the JSON names none


# --------------------------------------------------------------------------- measurement


def _with_checkpointing(cfg: ImagenConfig, on: bool) -> ImagenConfig:
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, checkpoint_activations=on))


def follow_cuda_autocast_norms(net: torch.nn.Module) -> None:
    """Make net's GroupNorm / LayerNorm layers run in fp32 under CPU autocast, as CUDA autocast does.

    CUDA autocast runs group_norm and layer_norm in fp32 (torch.amp's fp32 list); CPU autocast
    keeps them in bf16, which would halve the GroupNorm-SiLU activations a GPU stores. Patching
    the layers (rather than a function mode) keeps the rule inside checkpoint recomputation,
    which runs in backward. Other ops of that list (softmax, exp, ...) act on small or already
    fp32 tensors in these networks and are left alone.
    """
    for m in net.modules():
        if isinstance(m, torch.nn.GroupNorm):
            def forward(x, m=m):
                if not torch.is_autocast_enabled(x.device.type):
                    return torch.nn.functional.group_norm(x, m.num_groups, m.weight, m.bias, m.eps)
                w, b = (None if t is None else t.float() for t in (m.weight, m.bias))
                return torch.nn.functional.group_norm(x.float(), m.num_groups, w, b, m.eps)
        elif isinstance(m, torch.nn.LayerNorm):
            def forward(x, m=m):
                if not torch.is_autocast_enabled(x.device.type):
                    return torch.nn.functional.layer_norm(x, m.normalized_shape, m.weight, m.bias, m.eps)
                w, b = (None if t is None else t.float() for t in (m.weight, m.bias))
                return torch.nn.functional.layer_norm(x.float(), m.normalized_shape, w, b, m.eps)
        else:
            continue
        m.forward = forward


class _ReadScalarsAsOne(TorchDispatchMode):
    """Fake tensors hold no values: a host read (`bool(mask.all())`) answers True / 1 here."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            return True if args[0].dtype == torch.bool else 1
        return func(*args, **(kwargs or {}))


def _training_dtype(cfg: ImagenConfig) -> torch.dtype:
    # DeepSpeed's bf16 mode holds the module's weights in bf16
    return torch.bfloat16 if cfg.training.precision == "bf16" else torch.float32


def _autocast(cfg: ImagenConfig, device_type: str):
    """The engine's bf16 autocast (training.engine.autocast_for)."""
    if cfg.training.precision == "bf16":
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _micro_step_fn(cfg: ImagenConfig, net, diffusion, batch_size: int, device: torch.device, device_type: str):
    """One forward + backward of the training loss; the batch is made inside (it is activation memory)."""

    def step() -> None:
        batch = synthetic_batch(cfg, batch_size, device)
        with _autocast(cfg, device_type):
            per_sample = diffusion.training_loss(net, batch["image"], batch["text_emb"], batch["text_mask"],
                                                 lowres=batch.get("lowres"))
        per_sample.float().mean().backward()

    return step


def _build_for_measure(cfg: ImagenConfig, device: torch.device):
    from imagen_ds.models import build_model

    old = torch.get_default_dtype()
    torch.set_default_dtype(_training_dtype(cfg))  # build in the training dtype (fake tensors cannot .to())
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            with torch.device(device):
                net = build_model(cfg)
    finally:
        torch.set_default_dtype(old)
    for p in net.parameters():
        p.grad = torch.zeros_like(p)  # gradients are model state: live before the step, not activations
    return net


def measure_activation_bytes(cfg: ImagenConfig, batch_sizes=MEASURE_BATCHES, where: str = "cpu",
                             like_cuda: bool = True) -> dict:
    """Peak bytes above the model state of one micro-step at each batch size, on `where`.

    like_cuda: off the GPU, follow CUDA autocast's fp32 ops (a plan is for GPUs); False sizes a
    CPU run itself.
    """
    from imagen_ds.diffusion import build_diffusion

    diffusion = build_diffusion(cfg)
    if where == "fake":
        from torch._subclasses.fake_tensor import FakeTensorMode

        peaks = {}
        with FakeTensorMode(), _ReadScalarsAsOne():
            net = _build_for_measure(cfg, torch.device("cpu"))
            if like_cuda:
                follow_cuda_autocast_norms(net)
            for b in batch_sizes:
                step = _micro_step_fn(cfg, net, diffusion, b, torch.device("cpu"), "cpu")
                with StorageLedger() as ledger:
                    step()
                peaks[b] = ledger.peak
        return {"peaks": peaks, "method": "fake tensors + tensor-storage ledger (no kernel workspaces)"}

    device = torch.device("cuda", torch.cuda.current_device()) if where == "cuda" else torch.device("cpu")
    net = _build_for_measure(cfg, device)
    if like_cuda and device.type != "cuda":
        follow_cuda_autocast_norms(net)
    peaks, method = {}, None
    for b in batch_sizes:
        step = _micro_step_fn(cfg, net, diffusion, b, device, device.type)
        step()  # first-call allocations (cuDNN autotuning, lazy buffers) are not the steady state
        peaks[b], method = measure_peak_bytes(step, device)
    del net
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"peaks": peaks, "method": method}


def activation_line(peaks: dict[int, int]) -> tuple[float, float]:
    """(fixed bytes, bytes per sample) of the straight line through the measured peaks."""
    (b1, p1), (b2, p2) = sorted(peaks.items())[:2]
    per_sample = (p2 - p1) / (b2 - b1)
    return p1 - per_sample * b1, per_sample


def choose_device(cfg: ImagenConfig, measure_on: str) -> str:
    if measure_on != "auto":
        if measure_on == "cuda" and not torch.cuda.is_available():
            from imagen_ds.errors import ConfigError

            raise ConfigError("--measure-on", "cuda", "no CUDA device here; use cpu or fake")
        return measure_on
    if torch.cuda.is_available():
        return "cuda"
    from imagen_ds.bench.flops import train_flops_per_sample

    # both checkpointing settings, all batch sizes, plus a warm-up step each
    work = train_flops_per_sample(cfg) * 2 * 2 * sum(MEASURE_BATCHES)
    return "cpu" if work <= CPU_MEASURE_MAX_FLOPS else "fake"


# --------------------------------------------------------------------------- the plan


def resolved_ds_config(cfg: ImagenConfig, gpus: int, micro_batch: int, ds_config=None) -> tuple[dict, ImagenConfig]:
    """The DeepSpeed dict `train` would use (training.ds_config), for this micro-batch and world size."""
    from imagen_ds.training.ds_config import build_ds_config

    cfg = cfg.replace(training={"micro_batch": micro_batch, "global_batch": micro_batch * gpus})
    return build_ds_config(cfg, gpus, ds_config)


def zero_bucket_bytes(ds: dict, precision: str) -> int:
    """ZeRO 1/2's contiguous gradient buffers (stage_1_and_2.setup_buckets): reduce_bucket_size
    elements in the weights' dtype, a second one with overlap_comm. Not capped by the model size."""
    zero = ds.get("zero_optimization", {})
    if int(zero.get("stage", 0)) not in (1, 2) or not zero.get("contiguous_gradients", True):
        return 0
    elements = int(float(zero.get("reduce_bucket_size", DS_DEFAULT_BUCKET)))
    copies = 2 if zero.get("overlap_comm", False) else 1
    return elements * copies * (2 if precision == "bf16" else 4)


def predicted_peak(states: int, bucket: int, fixed: float, per_sample: float, micro_batch: int) -> int:
    return int(states + bucket + fixed + per_sample * micro_batch)


def largest_micro_batch(budget: float, states: int, bucket: int, fixed: float, per_sample: float) -> int:
    """Largest B with predicted_peak(B) <= budget (0 if not even one sample fits)."""
    room = budget - states - bucket - fixed
    return max(0, int(math.floor(room / per_sample))) if per_sample > 0 else 0


def make_plan(model: str | ImagenConfig, *, gpus: int = 8, gpu_mem_gb: float = 80.0, zero_stage: Optional[int] = None,
              measure_on: str = "auto", micro_batch: Optional[int] = None, ds_config=None,
              for_cpu: bool = False) -> dict:
    """The plan for `gpus` data-parallel GPUs of `gpu_mem_gb` GiB each (see the module docstring)."""
    from imagen_ds.errors import ConfigError
    from imagen_ds.models import build_model, count_params

    if gpus < 1:
        raise ConfigError("--gpus", str(gpus), "needs at least 1 GPU")
    if gpu_mem_gb <= 0:
        raise ConfigError("--gpu-mem", str(gpu_mem_gb), "must be positive (GiB per GPU)")
    cfg = load_config(model) if isinstance(model, str) else model
    if zero_stage is not None:
        cfg = cfg.replace(training={"zero_stage": zero_stage})
    mb = micro_batch or cfg.training.micro_batch
    ds, cfg = resolved_ds_config(cfg, gpus, mb, ds_config)
    tr = cfg.training
    stage = tr.zero_stage
    with torch.device("meta"):
        params = count_params(build_model(cfg))
    states = model_state_bytes(params, stage, gpus, precision=tr.precision, ema=not tr.ema_on_cpu)
    bucket = zero_bucket_bytes(ds, tr.precision)
    budget = gpu_mem_gb * GB * (1 - HEADROOM)
    where = choose_device(cfg, measure_on)

    options = {}
    for ckpt in (False, True):
        measured = measure_activation_bytes(_with_checkpointing(cfg, ckpt), MEASURE_BATCHES, where,
                                            like_cuda=not for_cpu)
        fixed, per_sample = activation_line(measured["peaks"])
        best = largest_micro_batch(budget, states["total"], bucket, fixed, per_sample)
        options["checkpointing" if ckpt else "no_checkpointing"] = {
            "measured_peak_bytes": {str(b): p for b, p in measured["peaks"].items()},
            "method": measured["method"],
            "activation_fixed_bytes": fixed,
            "activation_bytes_per_sample": per_sample,
            "largest_micro_batch": best,
            "predicted_peak_bytes_at_largest": predicted_peak(states["total"], bucket, fixed, per_sample, best)
            if best else None,
            "predicted_peak_bytes_at_config_micro_batch": predicted_peak(states["total"], bucket, fixed,
                                                                         per_sample, mb),
        }
    cur = options["checkpointing" if cfg.model.checkpoint_activations else "no_checkpointing"]
    no_ckpt = options["no_checkpointing"]
    return {
        "model": cfg.name, "params": params, "gpus": gpus, "gpu_mem_gb": gpu_mem_gb, "zero_stage": stage,
        "precision": tr.precision, "config_micro_batch": mb,
        "config_checkpoint_activations": cfg.model.checkpoint_activations,
        "model_state_bytes": states, "zero_bucket_bytes": bucket, "budget_bytes": int(budget),
        "measured_on": where, "options": options,
        "micro_batch": cur["largest_micro_batch"],
        "predicted_peak_gb": cur["predicted_peak_bytes_at_largest"] / GB if cur["largest_micro_batch"] else None,
        "predicted_peak_gb_at_config_micro_batch": cur["predicted_peak_bytes_at_config_micro_batch"] / GB,
        "config_micro_batch_fits": cur["predicted_peak_bytes_at_config_micro_batch"] <= budget,
        "checkpointing_needed_for_config_micro_batch":
            no_ckpt["predicted_peak_bytes_at_config_micro_batch"] > budget,
        "assumptions": assumptions(cfg, where, stage, gpus, bucket, ds),
    }


def predict_peak_bytes(plan: dict, *, gpus: int, micro_batch: int, checkpointing: bool) -> int:
    """A plan's predicted peak for another world size / micro-batch (the activation line is per GPU)."""
    o = plan["options"]["checkpointing" if checkpointing else "no_checkpointing"]
    states = model_state_bytes(plan["params"], plan["zero_stage"], gpus, precision=plan["precision"],
                               ema=plan["model_state_bytes"]["ema"] > 0)
    return predicted_peak(states["total"], plan["zero_bucket_bytes"], o["activation_fixed_bytes"],
                          o["activation_bytes_per_sample"], micro_batch)


def assumptions(cfg: ImagenConfig, where: str, stage: int, gpus: int, bucket: int, ds: dict) -> list[str]:
    tr = cfg.training
    low = "bf16" if tr.precision == "bf16" else "fp32"
    zero = ds.get("zero_optimization", {})
    master = "fp32 master + " if low == "bf16" else ""
    items = [
        f"model state per GPU: {low} weights and gradients, {master}Adam m, v "
        f"({'sharded over ' + str(gpus) + ' GPU(s)' if stage >= 1 else 'not sharded'}, ZeRO-{stage}), "
        f"fp32 EMA {'on the CPU' if tr.ema_on_cpu else 'on every GPU'}",
        f"DeepSpeed gradient buckets: {bucket / GB:.2f} GiB (reduce_bucket_size "
        f"{float(zero.get('reduce_bucket_size', DS_DEFAULT_BUCKET)):.0e} elements"
        f"{' x 2 for overlap_comm' if zero.get('overlap_comm') else ''})" if bucket else "no ZeRO gradient buckets",
        f"activations: one micro-step (diffusion loss under {low} autocast + backward) measured at batch "
        f"{' and '.join(map(str, MEASURE_BATCHES))} and extrapolated linearly in the batch size",
        f"fits = predicted peak allocated <= {1 - HEADROOM:.0%} of GPU memory ({HEADROOM:.0%} kept for "
        f"allocator fragmentation); one process per GPU; no other tenant",
    ]
    if where == "fake":
        items.append("activations sized with fake tensors on the CPU (no GPU here): exact tensor sizes under "
                     "CPU autocast with GroupNorm/LayerNorm in fp32 as CUDA autocast runs them, but no cuDNN / "
                     "attention workspaces and the CPU attention kernel; expect the GPU's peak a few percent higher")
    elif where == "cpu":
        items.append("activations measured on the CPU (norm layers in fp32 as under CUDA autocast): CPU kernels' "
                     "workspaces and attention kernel stand in for the GPU's")
    return items


def format_plan(p: dict) -> str:
    gb = lambda b: f"{b / GB:.2f} GiB"  # noqa: E731
    s = p["model_state_bytes"]
    lines = [
        f"{p['model']} ({p['params'] / 1e6:.0f}M params) on {p['gpus']} x {p['gpu_mem_gb']:g} GiB GPUs, "
        f"ZeRO-{p['zero_stage']}, {p['precision']}",
        f"  model state per GPU   {gb(s['total'])} (" + ", ".join(f"{k} {gb(v)}" for k, v in s.items()
                                                             if k != "total") + ")",
        f"  ZeRO gradient buckets {gb(p['zero_bucket_bytes'])}",
        f"  activations measured  on {p['measured_on']}",
    ]
    for name, o in p["options"].items():
        peak = f"{gb(o['predicted_peak_bytes_at_largest'])}" if o["largest_micro_batch"] else "n/a"
        lines.append(f"  {name.replace('_', ' '):<21} {o['activation_bytes_per_sample'] / 2**20:.1f} MiB/sample + "
                     f"{o['activation_fixed_bytes'] / 2**20:.1f} MiB -> largest micro-batch "
                     f"{o['largest_micro_batch']} (predicted peak {peak})")
    setting = "on" if p["config_checkpoint_activations"] else "off"
    fits = "fits" if p["config_micro_batch_fits"] else "does NOT fit"
    lines += [
        f"  with the config's checkpointing ({setting}): largest micro-batch {p['micro_batch']}, predicted peak "
        + (f"{p['predicted_peak_gb']:.2f} GiB" if p["predicted_peak_gb"] else "n/a"),
        f"  config micro-batch {p['config_micro_batch']}: predicted peak "
        f"{p['predicted_peak_gb_at_config_micro_batch']:.2f} GiB, {fits}; activation checkpointing "
        + ("needed" if p["checkpointing_needed_for_config_micro_batch"] else "not needed"),
        "  assumptions:",
    ] + [f"    - {a}" for a in p["assumptions"]]
    return "\n".join(lines)
