"""Training checkpoints: DeepSpeed's files + ours, written so a crash never loses the last one.

<out>/checkpoints/
  latest                  tag of the newest COMPLETE checkpoint (rewritten atomically, last)
  step_00000400/          DeepSpeed's module + ZeRO optimizer shards (every rank writes its own)
    rng_rank0000.pt       python / numpy / torch / cuda RNG states of that rank
    ema.pt                fp32 EMA weights (identical on all ranks; rank 0 writes it)
    meta.json             step, samples seen, loader position, world size, seed, resolved config;
                          written after every rank finished, so its presence = complete

`save` must be called on every rank (DeepSpeed's save is collective; rank-0-only saves hang).
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imagen_ds.errors import ConfigError

log = logging.getLogger("imagen_ds.training")

TAG_RE = re.compile(r"^step_(\d+)$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- RNG


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- finding checkpoints


def is_complete(tag_dir: Path) -> bool:
    return (tag_dir / "meta.json").is_file()


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Complete checkpoint tags, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir() if p.is_dir() and TAG_RE.match(p.name) and is_complete(p)]
    return sorted(tags, key=lambda t: int(TAG_RE.match(t).group(1)))


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag `latest` names if complete, else the newest complete one, else None."""
    ckpt_dir = Path(ckpt_dir)
    latest = ckpt_dir / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        if is_complete(ckpt_dir / tag):
            return tag
    tags = complete_tags(ckpt_dir)
    return tags[-1] if tags else None


def resolve_checkpoint(path: str | Path) -> tuple[Path, str]:
    """A run dir, a checkpoints dir or one checkpoint's dir -> (checkpoints dir, tag)."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(str(p), "checkpoint", "no such file or directory")
    if p.is_dir() and is_complete(p):
        return p.parent, p.name
    for ckpt_dir in (p / "checkpoints", p):
        tag = latest_tag(ckpt_dir)
        if tag is not None:
            return ckpt_dir, tag
    raise ConfigError(str(p), "checkpoint", "holds no complete checkpoint (expected a run directory, "
                                            "its checkpoints/ folder, or a step_* folder with meta.json)")


def read_meta(ckpt_dir: Path, tag: str) -> dict:
    return json.loads((Path(ckpt_dir) / tag / "meta.json").read_text())


# --------------------------------------------------------------------------- save


def save(engine, ckpt_dir: Path, meta: dict, ema, keep_last: int) -> str:
    """Collective: every rank calls it. Returns the tag. `latest` moves only once all is on disk."""
    import torch.distributed as dist

    ckpt_dir = Path(ckpt_dir)
    rank = dist.get_rank()
    tag = tag_for(meta["step"])
    tag_dir = ckpt_dir / tag
    if rank == 0 and tag_dir.exists():  # a leftover of a crashed save of the same step
        shutil.rmtree(tag_dir)
    dist.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"imagen_ds": meta}, save_latest=False)
    _atomic_torch_save(rng_state(), tag_dir / f"rng_rank{rank:04d}.pt")
    if rank == 0:
        _atomic_torch_save(ema.state_dict(), tag_dir / "ema.pt")
    dist.barrier()  # every rank's shards, RNG and the EMA are on disk
    if rank == 0:
        _atomic_write_text(tag_dir / "meta.json", json.dumps(meta, indent=1, sort_keys=True))
        _atomic_write_text(ckpt_dir / "latest", tag)
        prune(ckpt_dir, keep_last)
    dist.barrier()
    return tag


def prune(ckpt_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints, and incomplete older ones."""
    if keep_last <= 0:
        return
    tags = complete_tags(ckpt_dir)
    keep = set(tags[-keep_last:])
    newest = int(TAG_RE.match(tags[-1]).group(1)) if tags else -1
    for p in ckpt_dir.iterdir():
        m = TAG_RE.match(p.name)
        if p.is_dir() and m and p.name not in keep and int(m.group(1)) <= newest:
            shutil.rmtree(p, ignore_errors=True)


# --------------------------------------------------------------------------- load (training)


def load(engine, ckpt_dir: Path, tag: str, ema) -> tuple[dict, dict | None]:
    """Collective. Restores weights, optimizer, schedule and EMA; returns (meta, this rank's RNG
    states or None when the world size changed). Set the RNG right before the first step.

    Same number of ranks: DeepSpeed's own load (bit-exact). Different number: the ZeRO shards
    do not fit, so the weights come from the consolidated fp32 state (exact fp32 masters), the
    schedule from the step, and the optimizer moments start fresh (logged as a warning).
    """
    import torch.distributed as dist

    ckpt_dir = Path(ckpt_dir)
    meta = read_meta(ckpt_dir, tag)
    world, rank = dist.get_world_size(), dist.get_rank()
    if meta["world_size"] == world:
        path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag)
        if path is None:
            raise ConfigError(str(ckpt_dir / tag), "checkpoint", "DeepSpeed could not load it")
        rng = torch.load(ckpt_dir / tag / f"rng_rank{rank:04d}.pt", weights_only=False)
    else:
        _load_consolidated(engine, ckpt_dir, tag, meta)
        if rank == 0:
            log.warning("resuming %s saved by %d ranks on %d ranks: weights and EMA restored exactly from the "
                        "consolidated fp32 state; optimizer moments restart; data order and RNG streams "
                        "are re-seeded", tag, meta["world_size"], world)
        rng = None
    ema.load_state_dict(torch.load(ckpt_dir / tag / "ema.pt", map_location="cpu", weights_only=False))
    return meta, rng


def consolidated_fp32(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """Full fp32 weights of a checkpoint: ZeRO master weights if present, else the module's."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag_dir = Path(ckpt_dir) / tag
    if any(tag_dir.glob("*optim_states.pt")) and any(tag_dir.glob("*zero_pp_rank_*")):
        sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    else:
        sd = {}
    module = module_state(ckpt_dir, tag)
    # buffers (and anything ZeRO did not hold) come from the module file
    return {k: sd.get(k, v).float() if v.is_floating_point() else v for k, v in module.items()}


def module_state(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    files = sorted((Path(ckpt_dir) / tag).glob("mp_rank_*_model_states.pt"))
    if not files:
        raise ConfigError(str(Path(ckpt_dir) / tag), "checkpoint", "no mp_rank_*_model_states.pt in it")
    return torch.load(files[0], map_location="cpu", weights_only=False)["module"]


def _load_consolidated(engine, ckpt_dir: Path, tag: str, meta: dict) -> None:
    from deepspeed.utils import safe_set_full_fp32_param

    sd = consolidated_fp32(ckpt_dir, tag)
    with torch.no_grad():
        for name, p in engine.module.named_parameters():
            value = sd[name].to(engine.device)
            safe_set_full_fp32_param(p, value)  # the ZeRO fp32 master partition
            p.copy_(value.to(p.dtype))          # the bf16 working copy
        for name, b in engine.module.named_buffers():
            if name in sd:
                b.copy_(sd[name].to(b.dtype))
    engine.global_steps = meta["step"]
    engine.global_samples = meta["samples_seen"]
    sched = engine.lr_scheduler
    if sched is not None:
        sched.last_epoch = meta["step"] - 1
        sched.step()


# --------------------------------------------------------------------------- inference


def load_for_inference(path: str | Path, ema: bool = True, device: str = "cpu"):
    """-> (network in eval mode, fp32, on `device`; its ImagenConfig).

    `path`: a run directory (its latest checkpoint), a checkpoints dir, one step_* dir, or a
    .safetensors file written by `imagen-ds export`. ema=False gives the raw trained weights.
    """
    from imagen_ds.config import config_from_dict
    from imagen_ds.models import build_model

    p = Path(path)
    if p.suffix == ".safetensors":
        from imagen_ds.training.export import read_safetensors

        sd, cfg, info = read_safetensors(p)
        if ema and info.get("ema") == "false":
            log.info("%s holds the raw (non-EMA) weights; using them", p)
    else:
        ckpt_dir, tag = resolve_checkpoint(p)
        meta = read_meta(ckpt_dir, tag)
        cfg = config_from_dict(meta["config"], source=str(ckpt_dir / tag / "meta.json"))
        sd = inference_state_dict(ckpt_dir, tag, ema)
    net = build_model(cfg)
    net.load_state_dict(sd)
    return net.to(device).eval(), cfg


def inference_state_dict(ckpt_dir: Path, tag: str, ema: bool) -> dict[str, torch.Tensor]:
    """fp32 state dict of one checkpoint: EMA parameters (+ module buffers) or the raw weights."""
    if not ema:
        return consolidated_fp32(ckpt_dir, tag)
    module = module_state(ckpt_dir, tag)
    shadow = torch.load(Path(ckpt_dir) / tag / "ema.pt", map_location="cpu", weights_only=False)["shadow"]
    return {k: shadow[k] if k in shadow else (v.float() if v.is_floating_point() else v)
            for k, v in module.items()}
