"""Sampling for evaluation: one base checkpoint, optionally followed by the SR stages.

The swept guidance weight applies to the base model (the paper's sweeps are of the 64x64
model); SR stages sample with their own config's guidance. `steps` and `sampler` overrides
apply to every stage. Noise comes from one torch.Generator per batch seeded with
(seed, index of the batch's first image), so a resumed run redraws exactly the batches it
lacks; the same seed gives every guidance weight and checkpoint the same starting noise.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from imagen_ds.errors import ConfigError


@dataclass
class Stage:
    name: str                 # "base", "sr256", "sr1024"
    checkpoint: str
    net: torch.nn.Module
    cfg: object               # ImagenConfig
    diffusion: object
    sampling: object          # SamplingConfig (guidance of the base is set per sweep point)

    def describe(self) -> dict:
        s = self.sampling
        return {"stage": self.name, "checkpoint": str(Path(self.checkpoint).resolve()), "resolution": self.cfg.model.resolution,
                "sampler": s.sampler, "steps": s.steps, "guidance": s.guidance, "threshold": s.threshold}


def load_stage(name: str, checkpoint: str, device: torch.device, steps: Optional[int],
               sampler: Optional[str]) -> Stage:
    from imagen_ds.diffusion import build_diffusion
    from imagen_ds.training.checkpoint import load_for_inference

    net, cfg = load_for_inference(checkpoint, ema=True, device=device)
    overrides = {k: v for k, v in (("steps", steps), ("sampler", sampler)) if v is not None}
    if overrides:
        cfg = cfg.replace(sampling=overrides)  # validates the sampler against the stage's scheme
    return Stage(name, checkpoint, net, cfg, build_diffusion(cfg), cfg.sampling)


def load_cascade(base: str, sr: list[tuple[str, str]], device: torch.device, steps: Optional[int],
                 sampler: Optional[str]) -> list[Stage]:
    stages = [load_stage("base", base, device, steps, sampler)]
    if stages[0].cfg.model.is_sr:
        raise ConfigError("--checkpoints", base, "is a super-resolution model; pass base models to "
                          "--checkpoints and SR models to --sr256/--sr1024")
    for name, path in sr:
        stage = load_stage(name, path, device, steps, sampler)
        prev = stages[-1].cfg.model.resolution
        if not stage.cfg.model.is_sr or stage.cfg.model.lowres_resolution != prev:
            raise ConfigError(f"--{name}", path, f"expected an SR model with {prev}-px low-res input, got "
                              f"{stage.cfg.name} ({stage.cfg.model.lowres_resolution} -> "
                              f"{stage.cfg.model.resolution})")
        stages.append(stage)
    return stages


class TextCache:
    """One loaded text encoder per name, shared by all checkpoints of the sweep."""

    def __init__(self, device: torch.device):
        self.device, self.encoders = device, {}

    def encode(self, cfg, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        from imagen_ds.text import load_encoder

        name = cfg.text.encoder
        if name not in self.encoders:
            self.encoders[name] = load_encoder(name, device=self.device)
        emb, mask = self.encoders[name].encode(captions, cfg.text.max_tokens)  # [B,T,D], [B,T]
        if emb.shape[-1] != cfg.text.dim:
            raise ConfigError(cfg.source, "text.dim", f"encoder {name} gives {emb.shape[-1]}-d embeddings, "
                              f"the model expects {cfg.text.dim}")
        return emb.to(self.device), mask.to(self.device)


@torch.no_grad()
def sample_batch(stages: list[Stage], captions: list[str], guidance: float, generator: torch.Generator,
                 text: TextCache) -> torch.Tensor:
    """Images [B, 3, R, R] in [-1, 1] at the last stage's resolution."""
    import dataclasses

    x, encoded = None, {}
    for i, stage in enumerate(stages):
        key = (stage.cfg.text.encoder, stage.cfg.text.max_tokens)
        if key not in encoded:  # stages sharing an encoder share the embeddings
            encoded[key] = text.encode(stage.cfg, captions)
        emb, mask = encoded[key]
        sampling = dataclasses.replace(stage.sampling, guidance=guidance) if i == 0 else stage.sampling
        r = stage.cfg.model.resolution
        x = stage.diffusion.sample(stage.net, emb, mask, lowres=x, shape=(len(captions), 3, r, r),
                                   sampling=sampling, generator=generator)
    return x
