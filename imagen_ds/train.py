"""Training entry point for every launcher.

    deepspeed [--num_gpus N | --hostfile H] imagen_ds/train.py --model 2b_res_64 --data SHARDS --out runs/x
    torchrun --nproc_per_node N imagen_ds/train.py --model ...
    srun python imagen_ds/train.py --model ...          (rank info from SLURM_* variables)
    python -m imagen_ds.train --model tiny_res_32 ...   (one process)

`imagen-ds train` takes the same options (and --nproc to start local ranks itself).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the package, not its folder's modules
    sys.path[0] = str(Path(__file__).resolve().parent.parent)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imagen_ds/train.py", description="Train an Imagen model on DeepSpeed.")
    p.add_argument("--model", required=True, help="config name (model_configs/) or YAML path")
    p.add_argument("--data", required=True, nargs="+", help="shard directory, glob, brace pattern or .tar files")
    p.add_argument("--out", required=True, help="run directory (logs, checkpoints)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="optimizer steps (default: training.samples / global batch)")
    length.add_argument("--samples", type=int, help="training length in samples seen")
    p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint in --out")
    p.add_argument("--ds-config", help="DeepSpeed JSON (name in ds_configs/ or path); default by precision")
    p.add_argument("--micro-batch", type=int, help="override training.micro_batch (per rank)")
    p.add_argument("--global-batch", type=int, help="override training.global_batch")
    p.add_argument("--wandb", dest="wandb", action="store_true", default=False, help="log to Weights & Biases")
    p.add_argument("--no-wandb", dest="wandb", action="store_false")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int)
    p.add_argument("--save-every", type=int)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def apply_overrides(cfg, micro_batch: int | None, global_batch: int | None):
    changes = {}
    if micro_batch is not None:
        changes["micro_batch"] = micro_batch
    if global_batch is not None:
        changes["global_batch"] = global_batch
    return cfg.replace(training=changes) if changes else cfg


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from imagen_ds.config import load_config
    from imagen_ds.errors import ConfigError, DataError
    from imagen_ds.training.loop import TrainingStopped, train

    try:
        cfg = apply_overrides(load_config(args.model), args.micro_batch, args.global_batch)
        data = args.data[0] if len(args.data) == 1 else args.data
        summary = train(cfg, data, args.out, steps=args.steps, samples=args.samples, resume=args.resume,
                        ds_config=args.ds_config, seed=args.seed, use_wandb=args.wandb,
                        log_every=args.log_every, save_every=args.save_every, local_rank=args.local_rank)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except TrainingStopped as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 3
    if summary["stopped_by"]:
        print(f"stopped by {summary['stopped_by']} at step {summary['step']}; checkpoint {summary['checkpoint']}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
