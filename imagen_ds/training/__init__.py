"""The training engine: DeepSpeed (ZeRO-2, bf16), EMA, checkpoints, logging, the loop.

Public API (imports are lazy so `import imagen_ds.training` stays light):
    run(cfg_or_name, data, out, steps=..., resume=..., ...)   train in-process (see loop.train)
    build_engine(cfg, ...) -> BuiltEngine; train_step(built, diffusion, batches) -> StepResult
    load_for_inference(path, ema=True, device="cpu") -> (net.eval(), cfg)
    export(checkpoint, out, ema=True)
"""
from __future__ import annotations

_LAZY = {
    "run": "imagen_ds.training.loop", "train": "imagen_ds.training.loop",
    "TrainingStopped": "imagen_ds.training.loop",
    "build_engine": "imagen_ds.training.engine", "train_step": "imagen_ds.training.engine",
    "load_for_inference": "imagen_ds.training.checkpoint", "export": "imagen_ds.training.export",
    "EMA": "imagen_ds.training.ema",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)
