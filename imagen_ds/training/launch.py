"""`imagen-ds train --nproc N`: start N local ranks of imagen_ds/train.py with DeepSpeed's launcher."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from imagen_ds.training.dist_env import free_port, has_cuda

TRAIN_SCRIPT = Path(__file__).resolve().parent.parent / "train.py"


def launch_command(nproc: int, train_args: list[str], master_port: int | None = None) -> list[str]:
    """The `deepspeed --num_gpus N imagen_ds/train.py ...` command, via the launcher's module."""
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
            "--master_port", str(master_port or free_port()), str(TRAIN_SCRIPT), *train_args]


def launch_local(nproc: int, train_args: list[str]) -> int:
    """Run N ranks on this machine; on a CPU-only machine DeepSpeed's CPU accelerator (gloo)."""
    env = dict(os.environ)
    if "DS_ACCELERATOR" not in env and not has_cuda():
        env["DS_ACCELERATOR"] = "cpu"
    # the launcher must not inherit a single-process rendezvous from a parent
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    return subprocess.run(launch_command(nproc, train_args), env=env).returncode
