"""Sampling for evaluation: one base checkpoint, optionally followed by the SR stages.

The swept guidance weight applies to the base model (the paper's sweeps are of the 64x64
model); SR stages sample with their own config's guidance. `steps` and `sampler` overrides
apply to every stage. Noise comes from a seed per batch derived from
(seed, index of the batch's first image), so a resumed run redraws exactly the batches it
lacks; the same seed gives every guidance weight and checkpoint the same starting noise.
Sampling itself is `imagen_ds.diffusion.cascade.sample_cascade` (one stream per stage).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from imagen_ds.errors import ConfigError


@dataclass
class EvalStage:
    name: str                 # "base", "sr256", "sr1024"
    checkpoint: str
    stage: object             # imagen_ds.diffusion.cascade.Stage: net, cfg, sampling

    @property
    def cfg(self):
        return self.stage.cfg

    def describe(self) -> dict:
        s = self.stage.sampling
        return {"stage": self.name, "checkpoint": str(Path(self.checkpoint).resolve()),
                "resolution": self.cfg.model.resolution, "sampler": s.sampler, "steps": s.steps,
                "guidance": s.guidance, "threshold": s.threshold}


def load_stage(name: str, checkpoint: str, device: torch.device, steps: Optional[int],
               sampler: Optional[str]) -> EvalStage:
    from imagen_ds.diffusion.cascade import Stage
    from imagen_ds.training.checkpoint import load_for_inference

    net, cfg = load_for_inference(checkpoint, ema=True, device=device)
    overrides = {k: v for k, v in (("steps", steps), ("sampler", sampler)) if v is not None}
    if overrides:
        cfg = cfg.replace(sampling=overrides)  # validates the sampler against the stage's scheme
    return EvalStage(name, checkpoint, Stage(net=net, cfg=cfg, sampling=cfg.sampling))


def load_cascade(base: str, sr: list[tuple[str, str]], device: torch.device, steps: Optional[int],
                 sampler: Optional[str]) -> list[EvalStage]:
    from imagen_ds.diffusion.cascade import check_stages

    stages = [load_stage("base", base, device, steps, sampler)]
    if stages[0].cfg.model.is_sr:
        raise ConfigError("--checkpoints", base, "is a super-resolution model; pass base models to "
                          "--checkpoints and SR models to --sr256/--sr1024")
    stages += [load_stage(name, path, device, steps, sampler) for name, path in sr]
    check_stages([st.stage for st in stages])  # each SR stage's low-res side = the previous output side
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
def sample_batch(stages: list[EvalStage], captions: list[str], guidance: float, seed: int,
                 text: TextCache) -> torch.Tensor:
    """Images [B, 3, R, R] in [-1, 1] at the last stage's resolution, through the cascade sampler."""
    from imagen_ds.diffusion.cascade import sample_cascade

    encoded, run = {}, []
    for i, st in enumerate(stages):
        key = (st.cfg.text.encoder, st.cfg.text.max_tokens)
        if key not in encoded:  # stages sharing an encoder share the embeddings
            encoded[key] = text.encode(st.cfg, captions)
        sampling = dataclasses.replace(st.stage.sampling, guidance=guidance) if i == 0 else st.stage.sampling
        run.append(dataclasses.replace(st.stage, sampling=sampling, text=encoded[key]))
    emb, mask = run[0].text
    return sample_cascade(run, emb, mask, seed=seed)[-1]
