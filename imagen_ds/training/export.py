"""`imagen-ds export`: a slim inference file (weights + the config as safetensors metadata)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from imagen_ds.errors import ConfigError


def export(checkpoint: str | Path, out: str | Path, ema: bool = True) -> dict:
    """Write the EMA (or raw) fp32 weights of a checkpoint to `out`. Returns a small summary."""
    from safetensors.torch import save_file

    from imagen_ds.training.checkpoint import inference_state_dict, read_meta, resolve_checkpoint

    ckpt_dir, tag = resolve_checkpoint(checkpoint)
    meta = read_meta(ckpt_dir, tag)
    sd = inference_state_dict(ckpt_dir, tag, ema)
    sd = {k: v.detach().contiguous().clone() for k, v in sd.items()}  # no shared storage in safetensors
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ConfigError("--out", str(out), "expected a .safetensors file name")
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"config": json.dumps(meta["config"]), "ema": "true" if ema else "false",
                "step": str(meta["step"]), "samples_seen": str(meta["samples_seen"]),
                "source": str(ckpt_dir / tag), "format": "imagen_ds"}
    save_file(sd, str(out), metadata=metadata)
    params = sum(v.numel() for v in sd.values())
    return {"out": str(out), "checkpoint": str(ckpt_dir / tag), "ema": ema, "step": meta["step"],
            "tensors": len(sd), "params": params, "bytes": out.stat().st_size}


def read_safetensors(path: str | Path):
    """-> (state dict, ImagenConfig, metadata) of a file written by `export`."""
    from safetensors import safe_open

    from imagen_ds.config import config_from_dict

    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), "checkpoint", "no such file")
    sd = {}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        info = f.metadata() or {}
        for k in f.keys():
            sd[k] = f.get_tensor(k)
    if "config" not in info:
        raise ConfigError(str(path), "metadata.config", "not an imagen_ds export (no config in its metadata)")
    return sd, config_from_dict(json.loads(info["config"]), source=str(path)), info
