"""The DeepSpeed JSON for a run: the file's engine settings + batch fields from the model YAML.

Division of labour: the JSON (`ds_configs/zero2_bf16.json` by default) holds DeepSpeed's own
knobs (ZeRO buckets, overlap, grad-accumulation dtype); the model YAML holds the batch sizes
and optimiser. Precision, ZeRO stage and clipping live in both: a JSON the user names with
--ds-config wins and the resolved config is updated to say so; the default JSON follows the YAML.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from imagen_ds.config import ImagenConfig, ds_config_path
from imagen_ds.errors import ConfigError

BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")


def grad_accumulation(global_batch: int, micro_batch: int, world_size: int, source: str = "training") -> int:
    """accumulation = global / (micro x world), which must be a whole number >= 1."""
    per_step = micro_batch * world_size
    if global_batch % per_step != 0 or global_batch < per_step:
        raise ConfigError(source, "training.global_batch",
                          f"{global_batch} is not a multiple of micro_batch {micro_batch} x world size "
                          f"{world_size} = {per_step}; pick a global batch of k x {per_step} or change "
                          f"--micro-batch")
    return global_batch // per_step


def single_rank_stage(precision: str, zero_stage: int, world_size: int) -> int:
    """The ZeRO stage the default config runs: an fp32 run on one rank has nothing to partition.

    ZeRO-2's per-parameter gradient hooks and partitioned step cost ~20% of a small model's step
    on one rank (docs/performance.md), so one fp32 rank runs without ZeRO (stage 0, with
    `optim.NonFiniteGuard` doing the clip and the non-finite skip ZeRO did). bf16 keeps its
    stage: ZeRO-2 is what gives DeepSpeed's bf16 fp32 master weights and fp32 gradient
    accumulation (stage 0 refuses fp32 accumulation; stage 1's BF16 optimizer summed
    micro-batches in bf16, measured). A run resumed on more ranks goes back to the config's
    stage (checkpoint.load reads either).
    """
    if world_size == 1 and precision == "fp32" and zero_stage in (1, 2):
        return 0
    return zero_stage


def default_ds_config_name(cfg: ImagenConfig) -> str:
    return "zero2_bf16" if cfg.training.precision == "bf16" else "zero2_fp32"


def read_ds_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(str(path), f"line {e.lineno}", f"not valid JSON ({e.msg})") from None


def build_ds_config(cfg: ImagenConfig, world_size: int, ds_config: str | Path | dict | None = None
                    ) -> tuple[dict[str, Any], ImagenConfig]:
    """-> (DeepSpeed config dict, cfg with precision/zero_stage/grad_clip as DeepSpeed will run them)."""
    explicit = ds_config is not None
    if isinstance(ds_config, dict):
        ds, source = copy.deepcopy(ds_config), "<ds_config dict>"
    else:
        path = ds_config_path(ds_config if explicit else default_ds_config_name(cfg))
        ds, source = read_ds_json(path), str(path)

    tr = cfg.training
    accum = grad_accumulation(tr.global_batch, tr.micro_batch, world_size, cfg.source)
    wanted = {"train_micro_batch_size_per_gpu": tr.micro_batch, "gradient_accumulation_steps": accum,
              "train_batch_size": tr.global_batch}
    for key, value in wanted.items():
        if key in ds and ds[key] not in (value, "auto"):
            raise ConfigError(source, key, f"{ds[key]} disagrees with the model config and world size "
                                           f"{world_size} (expected {value}); remove it from the JSON, "
                                           f"the batch fields are filled from the model YAML")
        ds[key] = value

    zero = ds.setdefault("zero_optimization", {})
    if explicit:
        precision = "bf16" if ds.get("bf16", {}).get("enabled", False) else "fp32"
        if ds.get("fp16", {}).get("enabled", False):
            raise ConfigError(source, "fp16", "fp16 is not supported by imagen_ds (use bf16 or fp32)")
        stage = int(zero.get("stage", tr.zero_stage))
        clip = float(ds.get("gradient_clipping", tr.grad_clip))
        cfg = cfg.replace(training={"precision": precision, "zero_stage": stage, "grad_clip": clip})
    else:
        ds["bf16"] = {**ds.get("bf16", {}), "enabled": tr.precision == "bf16"}
        stage = single_rank_stage(tr.precision, tr.zero_stage, world_size)
        if stage != tr.zero_stage:
            cfg = cfg.replace(training={"zero_stage": stage})
    zero["stage"] = cfg.training.zero_stage
    ds["gradient_clipping"] = cfg.training.grad_clip
    if cfg.training.precision == "bf16" and cfg.training.zero_stage >= 1:
        # accumulate micro-batch gradients in fp32, not bf16 (bf16 loses small contributions)
        ds.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("zero_allow_untested_optimizer", True)
    return ds, cfg
