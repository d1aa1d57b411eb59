"""The Imagen cascade: sample the base model, then each super-resolution stage from the previous output.

Takes already-loaded stages (network + its config) and text embeddings; loading checkpoints and
encoding prompts belong to the caller (`imagen-ds sample`). Each stage has its own sampler, steps,
guidance weight and noise-augmentation level, and its own random stream derived from one seed, so
re-running with a changed SR setting keeps the base images.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from imagen_ds.config import ImagenConfig, SamplingConfig
from imagen_ds.diffusion import build_diffusion
from imagen_ds.errors import ConfigError


@dataclass
class Stage:
    net: torch.nn.Module
    cfg: ImagenConfig
    sampling: Optional[SamplingConfig] = None   # None: the config's own sampling section
    aug_level: Optional[float] = None           # SR stages; None: cfg.diffusion.noise_aug.sample_level
    text: Optional[tuple[Tensor, Tensor]] = None  # (text_emb, text_mask) if this stage's encoder differs


def stage_seed(seed: int, stage: int) -> int:
    """The base stage uses `seed` itself; later stages a stream derived from (seed, stage)."""
    if stage == 0:
        return seed
    digest = hashlib.sha256(f"imagen_ds cascade {seed} {stage}".encode()).digest()
    return int.from_bytes(digest[:7], "little")


def check_stages(stages: Sequence[Stage]) -> None:
    """Base first, then SR stages whose low-res side is the previous stage's output side."""
    if not stages:
        raise ConfigError("cascade", "stages", "needs at least a base model")
    first = stages[0].cfg
    if first.model.is_sr:
        raise ConfigError(first.source, "model.lowres_resolution",
                          f"the first cascade stage must be a base model; {first.name} is super-resolution "
                          f"({first.model.lowres_resolution} -> {first.model.resolution} px)")
    for prev, st in zip(stages, stages[1:]):
        m, r = st.cfg.model, prev.cfg.model.resolution
        if not m.is_sr:
            raise ConfigError(st.cfg.source, "model.lowres_resolution",
                              f"{st.cfg.name} follows {prev.cfg.name} in the cascade but is not a super-resolution model")
        if m.lowres_resolution != r:
            raise ConfigError(st.cfg.source, "model.lowres_resolution",
                              f"{st.cfg.name} up-samples {m.lowres_resolution}-px images but {prev.cfg.name} "
                              f"produces {r} px")


def _device(net) -> torch.device:
    p = next(net.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def sample_cascade(stages: Sequence[Stage], text_emb: Tensor, text_mask: Tensor, *, seed: int = 0,
                   progress: bool = False, on_stage: Optional[Callable[[int, Tensor], None]] = None,
                   ) -> list[Tensor]:
    """Images of every stage for text_emb [B, T, D] / text_mask [B, T]; each [B, 3, r, r] in [-1, 1].

    Stage i samples with a torch.Generator seeded by stage_seed(seed, i); SR stages take the previous
    stage's images as their clean low-res input (noise-augmented inside `sample`).
    """
    check_stages(stages)
    outputs: list[Tensor] = []
    for i, st in enumerate(stages):
        emb, mask = st.text if st.text is not None else (text_emb, text_mask)
        if emb.shape[-1] != st.cfg.text.dim:
            raise ConfigError(st.cfg.source, "text.dim",
                              f"{st.cfg.name} expects {st.cfg.text.dim}-d text embeddings, got {emb.shape[-1]}-d")
        device = _device(st.net)
        generator = torch.Generator(device=device).manual_seed(stage_seed(seed, i))
        r = st.cfg.model.resolution
        lowres = outputs[-1].to(device) if i > 0 else None
        images = build_diffusion(st.cfg).sample(
            st.net, emb.to(device), mask.to(device), lowres, shape=(emb.shape[0], 3, r, r),
            sampling=st.sampling, generator=generator, aug_level=st.aug_level, progress=progress)
        outputs.append(images)
        if on_stage is not None:
            on_stage(i, images)
    return outputs


def parse_per_stage(option: str, text: Optional[str], n: int, cast: Callable = str) -> list:
    """'30' -> [30] * n; '30,20' -> [30, 20] (one value per stage); None -> [None] * n."""
    if text is None:
        return [None] * n
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) not in (1, n):
        raise ConfigError(option, text, f"expected one value or {n} comma-separated values (one per stage)")
    try:
        values = [cast(p) for p in parts]
    except ValueError:
        raise ConfigError(option, text, f"expected {cast.__name__} values") from None
    return values * n if len(values) == 1 else values
