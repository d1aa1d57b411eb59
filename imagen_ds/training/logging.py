"""Where the numbers go: console status line, metrics.jsonl, Weights & Biases (rank 0 only)."""
from __future__ import annotations

import json
import logging
import os
import resource
import secrets
import sys
from pathlib import Path

import torch

log = logging.getLogger("imagen_ds.training")


def setup_console(rank: int) -> None:
    """Rank 0 prints INFO; the others only warnings (else every line appears N times)."""
    logger = logging.getLogger("imagen_ds")
    if not logger.handlers:
        h = logging.StreamHandler(sys.stdout)
        h.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(h)
        logger.propagate = False
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)


def peak_memory_gb(device: torch.device) -> float:
    """Peak accelerator memory of this process, or its peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB on Linux


def status_line(m: dict, total_steps: int | None) -> str:
    parts = [f"step {m['step']}" + (f"/{total_steps}" if total_steps else ""),
             f"loss {m['loss']:.4f}", f"lr {m['lr']:.2e}"]
    if m.get("grad_norm") is not None:
        parts.append(f"gnorm {m['grad_norm']:.3f}")
    parts.append(f"{m['samples_per_s']:.1f} samples/s")
    if m.get("tflops") is not None:
        parts.append(f"{m['tflops']:.2f} TFLOP/s")
    parts += [f"step {m['step_time']:.3f}s", f"data {m['data_wait']:.3f}s", f"mem {m['peak_mem_gb']:.2f}GB"]
    if m.get("skipped_steps"):
        parts.append(f"skipped {m['skipped_steps']}")
    return " | ".join(parts)


class MetricsLogger:
    """Rank 0 writes; other ranks hold a logger that does nothing."""

    def __init__(self, out: Path, rank: int, *, resume_step: int, use_wandb: bool, cfg, total_steps: int | None):
        self.active = rank == 0
        self.out = Path(out)
        self.total_steps = total_steps
        self.wandb_run = None
        if not self.active:
            return
        self.path = self.out / "metrics.jsonl"
        self._drop_lines_after(resume_step)
        if use_wandb:
            self.wandb_run = self._init_wandb(cfg)

    def _drop_lines_after(self, step: int) -> None:
        """A run resumed from step N forgets lines a crashed attempt wrote past N (no duplicates)."""
        if not self.path.is_file():
            return
        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in keep))

    def _init_wandb(self, cfg):
        try:
            import wandb
        except ImportError:
            log.warning("wandb is not installed (pip install 'imagen_ds[wandb]'); logging to metrics.jsonl only")
            return None
        id_file = self.out / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id)
        run = wandb.init(project=os.environ.get("WANDB_PROJECT", "imagen_ds"), id=run_id, resume="allow",
                         dir=str(self.out), name=self.out.name, config=cfg.to_dict())
        log.info("wandb run %s (mode %s)", run_id, os.environ.get("WANDB_MODE", "online"))
        return run

    def log(self, metrics: dict) -> None:
        if not self.active:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics, sort_keys=True) + "\n")
        log.info(status_line(metrics, self.total_steps))
        if self.wandb_run is not None:
            self.wandb_run.log({f"train/{k}": v for k, v in metrics.items() if k != "step"}, step=metrics["step"])

    def log_images(self, step: int, grid_path: Path, captions: list[str]) -> None:
        if self.active and self.wandb_run is not None:
            import wandb

            self.wandb_run.log({"samples": wandb.Image(str(grid_path), caption=" | ".join(captions))}, step=step)

    def message(self, text: str) -> None:
        if self.active:
            log.info(text)

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
