"""Who am I in the job: rank, world size and rendezvous from whatever launched us.

The same `imagen_ds/train.py` runs under the `deepspeed` launcher (RANK/LOCAL_RANK/WORLD_SIZE
plus `--local_rank`), `torchrun` (the same variables), `srun` (SLURM_PROCID/SLURM_NTASKS/
SLURM_LOCALID, rendezvous host = first node of SLURM_JOB_NODELIST) and plain `python` (nothing
set: a single process, for which DeepSpeed still needs the variables or it looks for mpi4py).
"""
from __future__ import annotations

import logging
import os
import re
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    launcher: str  # "torch" (deepspeed / torchrun), "slurm" or "single"


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list: 'gpu[003-005,010],cpu1' -> 'gpu003'.

    Done here rather than with `scontrol show hostnames` so no SLURM binary is needed.
    """
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not m:
        return nodelist
    prefix, _, ranges = m.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def setup_env(local_rank_arg: int | None = None, environ: dict | None = None) -> DistEnv:
    """Fill RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT from the launcher's variables.

    Writes into `environ` (default os.environ) so torch.distributed's env:// rendezvous works.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = "torch"
        if local_rank_arg is not None and local_rank_arg >= 0:
            env["LOCAL_RANK"] = str(local_rank_arg)
        env.setdefault("LOCAL_RANK", env["RANK"])
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        launcher = "slurm"
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        if "MASTER_ADDR" not in env:
            nodes = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
            env["MASTER_ADDR"] = first_slurm_host(nodes)
        # every task derives the same port from the job id, so no extra rendezvous is needed
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
    else:
        launcher = "single"
        env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = "0", "1", "0"
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(free_port()))
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", "29500")
    # A one-process job is its own rendezvous, so a busy port (one inherited from a parent
    # process that still holds it) can be swapped for a free one without telling anyone.
    if env["WORLD_SIZE"] == "1" and env["MASTER_ADDR"] in ("127.0.0.1", "localhost") \
            and not port_is_free(int(env["MASTER_PORT"])):
        env["MASTER_PORT"] = str(free_port())
    return DistEnv(int(env["RANK"]), int(env["LOCAL_RANK"]), int(env["WORLD_SIZE"]), launcher)


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def default_accelerator() -> None:
    """On a machine without CUDA, DeepSpeed must use its CPU accelerator (gloo)."""
    if "DS_ACCELERATOR" not in os.environ and not has_cuda():
        os.environ["DS_ACCELERATOR"] = "cpu"


# Building DeepSpeed's CPU communication op takes ~40 s; a lock older than this was left by a
# process killed mid-build, and every later start would wait on it forever.
STALE_LOCK_S = 300.0


def clear_stale_extension_locks(now: float | None = None) -> list[str]:
    """Remove torch-extension build locks no live build can own (older than STALE_LOCK_S)."""
    import glob
    import time

    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    now = time.time() if now is None else now
    removed = []
    for lock in glob.glob(os.path.join(root, "**", "lock"), recursive=True):
        try:
            if now - os.path.getmtime(lock) > STALE_LOCK_S:
                os.remove(lock)
                removed.append(lock)
        except OSError:
            pass  # another process took care of it
    return removed


def init_distributed(env: DistEnv) -> None:
    """Start the process group once (gloo on CPU, nccl on CUDA: DeepSpeed picks by accelerator)."""
    default_accelerator()
    import deepspeed
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    for lock in clear_stale_extension_locks():
        logging.getLogger("imagen_ds.training").warning(
            "removed %s, a build lock left by a killed process (it would block DeepSpeed's start)", lock)
    if has_cuda():
        torch.cuda.set_device(env.local_rank)
    deepspeed.init_distributed(dist_init_required=True)
