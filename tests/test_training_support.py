"""Helpers for the training tests (no tests here): shared tiny shards, a fast config, launching.

Run as a script it is the 'two ranks x m == one rank x 2 accumulation x m' probe: it builds the
engine with the public `build_engine` / `train_step` and writes the first step's loss, gradient
norm and fp32 weights (before and after) to a .pt file.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable


def demo_shards(tmp_path_factory) -> Path:
    """48 captioned 32-px shape images with tiny-T5 embeddings in 4 shards, made once per session."""
    root = tmp_path_factory.getbasetemp() / "training_shards"
    if not (root / "heldout.json").is_file():
        from imagen_ds.data.synthetic import make_demo_data

        make_demo_data(root, 48, seed=0, size=32, shard_size=12, encoder="t5-tiny-random", max_tokens=64)
    return root


def fast_config(path: Path, **training) -> Path:
    """tiny_res_32 with a learning rate that shows progress in a dozen steps."""
    d = yaml.safe_load((REPO / "model_configs" / "tiny_res_32.yaml").read_text())
    d["name"] = "tiny_train_test"
    d["training"].update({"lr": 2e-3, "warmup_steps": 2, "micro_batch": 2, "global_batch": 8, "save_every": 4,
                          "keep_last": 10, "log_every": 1, **training})
    path.write_text(yaml.safe_dump(d))
    return path


def subprocess_env() -> dict:
    env = dict(os.environ)
    # one thread per rank: two ranks on two shared cores; more threads spin and crawl
    env.update({"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline",
                "PYTHONUNBUFFERED": "1"})
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(key, None)
    return env


def cli(*args: str, timeout: int = 300, **popen) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "imagen_ds.cli", *args], cwd=REPO, env=subprocess_env(), capture_output=True,
                          text=True, timeout=timeout, **popen)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------- the equivalence probe


def _probe(cfg_path: str, shards: str, out: str, local_rank: int | None) -> None:
    import torch
    from deepspeed.utils import safe_get_full_fp32_param

    from imagen_ds.config import load_config
    from imagen_ds.data import make_train_loader
    from imagen_ds.diffusion import build_diffusion
    from imagen_ds.training.dist_env import init_distributed, setup_env
    from imagen_ds.training.engine import build_engine, train_step

    env = setup_env(local_rank)
    init_distributed(env)
    cfg = load_config(cfg_path)
    built = build_engine(cfg, ds_config="zero2_bf16", steps=10, seed=0)
    engine = built.engine

    def first_batch(r):  # the same samples whichever process layout: rank r of a 2-rank loader
        return next(iter(make_train_loader(cfg, shards, micro_batch=cfg.training.micro_batch, rank=r,
                                           world_size=2, seed=0)))

    feed = [env.rank] if env.world_size == 2 else [0, 1]

    def batches():
        for r in feed:
            torch.manual_seed(100 + r)  # the same noise for sample r, too
            yield first_batch(r)

    def weights():
        return {n: safe_get_full_fp32_param(p).detach().cpu().clone() for n, p in engine.module.named_parameters()}

    before = weights()
    res = train_step(built, build_diffusion(cfg), batches())
    loss = res.loss.reshape(1).clone()
    torch.distributed.all_reduce(loss)
    after = weights()
    if env.rank == 0:
        torch.save({"loss": loss.item() / env.world_size, "grad_norm": float(engine.get_global_grad_norm()),
                    "before": before, "after": after, "accumulation": built.accumulation}, out)


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("cfg")
    p.add_argument("shards")
    p.add_argument("out")
    p.add_argument("--local_rank", type=int, default=None)
    a = p.parse_args()
    _probe(a.cfg, a.shards, a.out, a.local_rank)
