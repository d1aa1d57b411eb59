"""Continuous-time DDPM (Kingma et al. 2021; Imagen's scheme): t ~ U(0, 1), z_t = alpha_t x0 + sigma_t eps.

The schedule is a log-SNR function of t (schedules.py: cosine or linear betas).

The network sees noise_cond = -lambda / 8. This is EDM's c_noise = ln(sigma_ve) / 4 at the
equivalent level sigma_ve = sigma_t / alpha_t = exp(-lambda / 2): O(1) over the schedule
(+-2.5 for lambda in [-20, 20]), and the same embedding input for the same noise level in both schemes.
"""
from __future__ import annotations

import math

import torch

from imagen_ds.config import DDPMConfig, ImagenConfig
from imagen_ds.diffusion.scheme import Diffusion, call_net
from imagen_ds.diffusion.schedules import SCHEDULES, alpha_sigma, logsnr_cosine, logsnr_linear  # noqa: F401


def noise_cond_from_logsnr(logsnr: torch.Tensor) -> torch.Tensor:
    """What the network embeds: -lambda / 8 (= ln(sigma_t / alpha_t) / 4, see module doc)."""
    return -logsnr / 8


def x0_from_eps(z, eps, alpha, sigma):
    return (z - sigma * eps) / alpha


def x0_from_v(z, v, alpha, sigma):
    """v = alpha eps - sigma x0 (Salimans & Ho 2022) => x0 = alpha z - sigma v."""
    return alpha * z - sigma * v


# --------------------------------------------------------------------------- the scheme


class DDPM(Diffusion):
    """Continuous DDPM with epsilon (default) or v prediction."""

    def __init__(self, cfg: ImagenConfig):
        super().__init__(cfg)
        self.ddpm: DDPMConfig = cfg.diffusion.ddpm
        self.logsnr = SCHEDULES[self.ddpm.schedule]

    def _predict_x0(self, out, z, alpha, sigma):
        if self.ddpm.prediction == "eps":
            return x0_from_eps(z, out, alpha, sigma)
        return x0_from_v(z, out, alpha, sigma)

    def denoise(self, net, x, sigma, text_emb, text_mask, lowres=None, aug_level=None, cond_drop=None):
        # VE coordinates -> the variance-preserving z the network was trained on
        sigma = sigma.to(torch.float32)
        logsnr = -2 * sigma.log()  # [B]
        alpha, sig = (v.view(-1, *([1] * (x.dim() - 1))) for v in alpha_sigma(logsnr))
        z = alpha * x
        out = call_net(net, z, noise_cond_from_logsnr(logsnr), text_emb, text_mask, lowres, aug_level, cond_drop)
        return self._predict_x0(out, z, alpha, sig)

    def scheme_loss(self, net, images, text_emb, text_mask, lowres, aug_level, cond_drop):
        b = images.shape[0]
        t = torch.rand(b, device=images.device)  # t ~ U(0, 1), global RNG
        logsnr = self.logsnr(t)  # [B]
        alpha, sigma = (v.view(-1, 1, 1, 1) for v in alpha_sigma(logsnr))
        eps = torch.randn_like(images)
        z = alpha * images + sigma * eps
        out = call_net(net, z, noise_cond_from_logsnr(logsnr), text_emb, text_mask, lowres, aug_level, cond_drop)
        target = eps if self.ddpm.prediction == "eps" else alpha * eps - sigma * images
        return (out - target).pow(2).flatten(1).mean(1)  # [B]

    def sampling_sigmas(self, steps: int) -> torch.Tensor:
        """Uniform t from 1 down to 0 as sigma_ve = exp(-lambda / 2), then sigma 0 (returns x0).

        t = 0 is a real step (lambda = LOGSNR_MAX, sigma ~ 5e-5), like EDM's sigma_min: stopping at
        t = 1/steps instead would leave the last x0 estimate blurred by a sizeable noise level.
        """
        t = torch.linspace(1.0, 0.0, steps, dtype=torch.float64) if steps > 1 else torch.ones(1, dtype=torch.float64)
        sigmas = (-self.logsnr(t).double() / 2).exp()
        return torch.cat([sigmas, sigmas.new_zeros(1)])

    def prior_std(self, sigma_max: float) -> float:
        # z_1 ~ N(0, I) in variance-preserving terms = N(0, (1 + sigma_max^2) I) for x = z / alpha
        return math.sqrt(1 + sigma_max ** 2)
