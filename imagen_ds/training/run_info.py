"""What a run directory records so a result can be traced and repeated."""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import platform
import socket
import subprocess
import sys
from pathlib import Path

import yaml

LIBRARIES = ("torch", "deepspeed", "transformers", "webdataset", "numpy", "safetensors", "wandb", "imagen_ds")


def git_commit(repo: Path | None = None) -> dict:
    repo = repo or Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10).stdout.strip() != ""
        return {"commit": sha or None, "dirty": dirty if sha else None}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def library_versions() -> dict:
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    try:
        import torch

        out["cuda"] = torch.version.cuda
    except ImportError:
        pass
    return out


def write_run_info(out: Path, cfg, ds_config: dict, *, seed: int, world_size: int, launcher: str,
                   optimizer: str, resumed_from: str | None, extra: dict | None = None) -> None:
    """config.yaml (resolved), ds_config.json and run_info.json (appends one entry per start)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    (out / "ds_config.json").write_text(json.dumps(ds_config, indent=1))
    entry = {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git": git_commit(), "versions": library_versions(), "seed": seed,
        "seeds": {"model_init": seed, "rank_rng": f"{seed} + rank", "data": seed},
        "world_size": world_size, "launcher": launcher, "optimizer": optimizer,
        "host": socket.gethostname(), "argv": sys.argv, "resumed_from": resumed_from, **(extra or {}),
    }
    path = out / "run_info.json"
    history = json.loads(path.read_text()).get("starts", []) if path.is_file() else []
    history.append(entry)
    path.write_text(json.dumps({**entry, "starts": history}, indent=1, default=str))
