"""Model-state memory per GPU under ZeRO (params, grads, optimizer states, EMA).

Mixed precision with AdamW keeps, per parameter: the low-precision weights and gradients
(bf16: 2 + 2 bytes), an fp32 master copy (4) and Adam's m and v (4 + 4); EMA adds an fp32
copy (4). ZeRO shards across the data-parallel ranks: stage 1 the fp32 master and Adam
states, stage 2 also the gradients, stage 3 also the weights. The EMA stays a full copy on
every rank (or on the CPU with training.ema_on_cpu). Activations are not included: the
planner of `imagen-ds plan` adds them.
"""
from __future__ import annotations

GB = 1024 ** 3


def model_state_bytes(num_params: int, zero_stage: int, world_size: int, *,
                      precision: str = "bf16", ema: bool = True) -> dict[str, int]:
    """Bytes per GPU of each part of the model state, and their "total"."""
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0..3, got {zero_stage}")
    n, w = num_params, max(1, world_size)
    low = 2 if precision == "bf16" else 4           # bytes of the weights / grads the model runs in

    def shard(nbytes: int, sharded_from_stage: int) -> int:
        return -(-nbytes // w) if zero_stage >= sharded_from_stage else nbytes  # ceil

    parts = {
        "params": shard(low * n, 3),
        "grads": shard(low * n, 2),
        # fp32 runs need no separate master copy: the weights are the master
        "master": shard(4 * n, 1) if precision == "bf16" else 0,
        "adam": shard(8 * n, 1),
        "ema": 4 * n if ema else 0,
    }
    parts["total"] = sum(parts.values())
    return parts
