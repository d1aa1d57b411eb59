"""`imagen-ds info`: what a config builds: parameters, FLOPs per training sample, memory."""
from __future__ import annotations

import torch

from imagen_ds.bench.flops import train_flops_per_sample, train_sample_shapes
from imagen_ds.bench.memory import GB, model_state_bytes
from imagen_ds.config import load_config


def model_info(name: str, gpus: int = 1) -> dict:
    """Facts of one config (a name from model_configs/ or a YAML path), for `gpus` data-parallel ranks."""
    from imagen_ds.models import build_model, count_params

    if gpus < 1:
        from imagen_ds.errors import ConfigError
        raise ConfigError("--gpus", "gpus", f"must be >= 1, got {gpus}")
    cfg = load_config(name)
    m, tr = cfg.model, cfg.training
    with torch.device("meta"):  # shapes only: even the 2B model costs no memory
        params = count_params(build_model(cfg))
    side, low = train_sample_shapes(cfg)
    ema_on_gpu = not tr.ema_on_cpu
    by_stage = {str(s): model_state_bytes(params, s, gpus, precision=tr.precision, ema=ema_on_gpu)["total"]
                for s in (0, 1, 2, 3)}
    state = model_state_bytes(params, tr.zero_stage, gpus, precision=tr.precision, ema=ema_on_gpu)
    return {
        "name": cfg.name,
        "description": cfg.description,
        "params": params,
        "unet": m.unet,
        "resolution": m.resolution,
        "lowres_resolution": m.lowres_resolution,
        "train_side": side,
        "train_lowres_side": low,
        "text_encoder": cfg.text.encoder,
        "text_dim": cfg.text.dim,
        "text_tokens": cfg.text.max_tokens,
        "diffusion": cfg.diffusion.scheme,
        "micro_batch": tr.micro_batch,
        "global_batch": tr.global_batch,
        "precision": tr.precision,
        "samples": tr.samples,
        "train_flops_per_sample": train_flops_per_sample(cfg),
        "gpus": gpus,
        "zero_stage": tr.zero_stage,
        "model_state_bytes_per_gpu": state,
        "model_state_bytes_per_gpu_by_stage": by_stage,
    }


def format_info(info: dict) -> str:
    state = info["model_state_bytes_per_gpu"]
    sr = f" (from {info['lowres_resolution']} px)" if info["lowres_resolution"] else ""
    crop = f", trains on {info['train_side']} px crops" if info["train_side"] != info["resolution"] else ""
    total_flops = info["train_flops_per_sample"] * info["samples"]
    lines = [
        f"{info['name']}: {info['description']}",
        f"  network      {info['unet']}, {info['params'] / 1e6:.1f}M parameters, {info['resolution']} px{sr}{crop}",
        f"  text         {info['text_encoder']} ({info['text_dim']}-d, {info['text_tokens']} tokens)",
        f"  diffusion    {info['diffusion']}",
        f"  training     micro batch {info['micro_batch']}/GPU, global batch {info['global_batch']}, "
        f"{info['precision']}, {info['samples']:.3g} samples",
        f"  FLOPs        {info['train_flops_per_sample'] / 1e9:.1f} GFLOP per training sample (fwd+bwd), "
        f"{total_flops:.3g} for the whole run",
        f"  model state  {state['total'] / GB:.2f} GiB per GPU with ZeRO-{info['zero_stage']} on {info['gpus']} GPU(s): "
        + ", ".join(f"{k} {v / GB:.2f}" for k, v in state.items() if k != "total"),
        "               by ZeRO stage: " + ", ".join(
            f"{s}: {b / GB:.2f} GiB" for s, b in info["model_state_bytes_per_gpu_by_stage"].items()),
    ]
    return "\n".join(lines)


def list_models() -> list[dict]:
    """Name and description of every config in model_configs/."""
    from imagen_ds.config import list_configs

    return [{"name": n, "description": load_config(n).description} for n in list_configs()]
