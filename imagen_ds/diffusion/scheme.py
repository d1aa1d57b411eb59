"""What EDM and continuous DDPM share: the training step around the scheme's loss and the sampling
loop around the scheme's denoiser.

Every scheme exposes its network as a denoiser in the variance-exploding coordinates of Karras et
al. (x = x0 + sigma * n, sigma >= 0): `denoise(net, x, sigma, ...) -> x0 estimate`. DDPM maps to
them by x = z / alpha, sigma = sigma_vp / alpha = exp(-logsnr / 2). The samplers, classifier-free
guidance and thresholding therefore see a single interface (as in k-diffusion) and every sampler
works with every scheme, base or super-resolution.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from imagen_ds.config import ImagenConfig, SamplingConfig
from imagen_ds.diffusion import samplers
from imagen_ds.diffusion.guidance import classifier_free_guidance, thresholded
from imagen_ds.diffusion.noise_aug import augment_lowres
from imagen_ds.errors import ConfigError

SAMPLERS = {
    "heun": samplers.sample_heun,
    "stochastic": samplers.sample_edm_stochastic,
    "ancestral": samplers.sample_ancestral,
    "ddim": samplers.sample_ddim,
}


def net_dtype(net) -> Optional[torch.dtype]:
    """Floating dtype of the network's weights (bf16 under DeepSpeed), None for parameter-free nets."""
    for p in net.parameters() if hasattr(net, "parameters") else ():
        if p.is_floating_point():
            return p.dtype
    return None


def call_net(net, x, noise_cond, text_emb, text_mask, lowres=None, aug_level=None, cond_drop=None):
    """The raw network call of the model contract; image-like inputs in the weights' dtype, fp32 out.

    noise_cond and aug_level stay fp32: their sinusoidal embeddings need the precision.
    """
    dt = net_dtype(net)
    cast = (lambda t: t.to(dt) if t is not None and dt is not None else t)
    out = net(cast(x), noise_cond.float(), cast(text_emb), text_mask,
              lowres=cast(lowres), aug_level=None if aug_level is None else aug_level.float(),
              cond_drop=cond_drop)
    return out.float()


class Diffusion:
    """Base of EDM and DDPM. Subclasses define denoise, scheme_loss, sampling_sigmas, prior_std."""

    def __init__(self, cfg: ImagenConfig):
        self.cfg = cfg
        self.is_sr = cfg.model.is_sr

    # ---------------------------------------------------------------- scheme-specific

    def denoise(self, net, x, sigma, text_emb, text_mask, lowres=None, aug_level=None, cond_drop=None):
        """x [B, C, H, W] at noise level sigma [B] (VE coordinates) -> x0 estimate, fp32."""
        raise NotImplementedError

    def scheme_loss(self, net, images, text_emb, text_mask, lowres, aug_level, cond_drop):
        raise NotImplementedError

    def sampling_sigmas(self, steps: int) -> torch.Tensor:
        """[steps + 1] decreasing noise levels, last one 0."""
        raise NotImplementedError

    def prior_std(self, sigma_max: float) -> float:
        raise NotImplementedError

    # ---------------------------------------------------------------- training

    def training_loss(self, net, images, text_emb, text_mask, lowres=None) -> torch.Tensor:
        """Per-sample fp32 loss [B]. Every random draw comes from torch's global RNG on images.device
        (cond-drop mask, aug level, aug noise, then the scheme's noise level and noise)."""
        b, device = images.shape[0], images.device
        images = images.float()
        # classifier-free guidance: the net swaps in its null text for these rows
        cond_drop = torch.rand(b, device=device) < self.cfg.diffusion.cond_drop_prob  # [B] bool
        aug_level = None
        if self.is_sr:
            if lowres is None:
                raise ValueError(f"{self.cfg.name} is a super-resolution config: training_loss needs lowres")
            aug_level = torch.rand(b, device=device) * self.cfg.diffusion.noise_aug.train_max_level  # [B]
            lowres = augment_lowres(lowres.float(), aug_level, torch.randn_like(lowres, dtype=torch.float32))
        elif lowres is not None:
            raise ValueError(f"{self.cfg.name} is a base config: it takes no lowres image")
        return self.scheme_loss(net, images, text_emb, text_mask, lowres, aug_level, cond_drop)

    # ---------------------------------------------------------------- sampling

    @torch.no_grad()
    def sample(self, net, text_emb, text_mask, lowres=None, *, shape, sampling: SamplingConfig | None = None,
               generator: torch.Generator, aug_level: float | None = None, progress: bool = False,
               ) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] for text_emb [B, T, D] / text_mask [B, T].

        SR configs need lowres [B, 3, h, w] (the clean previous-stage image in [-1, 1]); it is noised
        to aug_level (default cfg.diffusion.noise_aug.sample_level) with `generator`, which also draws
        the starting noise and any sampler noise.
        """
        s = sampling if sampling is not None else self.cfg.sampling
        if s.sampler not in SAMPLERS:
            raise ConfigError("sampling", "sampler", f"expected one of {', '.join(SAMPLERS)}, got {s.sampler!r}")
        if s.steps < 1:
            raise ConfigError("sampling", "steps", f"must be >= 1, got {s.steps}")
        device = text_emb.device
        b = shape[0]
        cond = {"text_emb": text_emb, "text_mask": text_mask}
        if self.is_sr:
            if lowres is None:
                raise ValueError(f"{self.cfg.name} is a super-resolution config: sample needs lowres")
            level = self.cfg.diffusion.noise_aug.sample_level if aug_level is None else float(aug_level)
            levels = torch.full((b,), level, device=device)  # [B]
            noise = torch.randn(lowres.shape, generator=generator, device=device)
            cond["lowres"] = augment_lowres(lowres.float(), levels, noise)
            cond["aug_level"] = levels

        def raw(x, sigma, cond_drop=None, **c):
            return self.denoise(net, x, sigma, cond_drop=cond_drop, **c)

        denoise = classifier_free_guidance(raw, cond, s.guidance)
        denoise = thresholded(denoise, s.threshold, s.threshold_percentile)

        sigmas = self.sampling_sigmas(s.steps).to(device=device, dtype=torch.float32)
        x = torch.randn(shape, generator=generator, device=device) * self.prior_std(float(sigmas[0]))
        kwargs = {"progress": progress}
        if s.sampler in ("stochastic", "ancestral"):
            kwargs["generator"] = generator
        if s.sampler == "stochastic":
            kwargs.update(s_churn=s.s_churn, s_min=s.s_min, s_max=s.s_max, s_noise=s.s_noise)
        x = SAMPLERS[s.sampler](denoise, x, sigmas, **kwargs)
        return x.clamp(-1, 1)


def with_sampling(sampling: SamplingConfig, **changes) -> SamplingConfig:
    """dataclasses.replace that ignores None values (CLI options left unset)."""
    return dataclasses.replace(sampling, **{k: v for k, v in changes.items() if v is not None})
