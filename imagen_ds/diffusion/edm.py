"""EDM (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models").

Each formula of the paper's Table 1 ("Ours" column) is one function below; `EDM` wires them into
the shared `Diffusion` interface. Coordinates are the paper's: x = x0 + sigma * n.
"""
from __future__ import annotations

import math

import torch

from imagen_ds.config import EDMConfig, ImagenConfig
from imagen_ds.diffusion.scheme import Diffusion, call_net


# --------------------------------------------------------------------------- Table 1, preconditioning


def c_skip(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    return sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)


def c_out(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    return sigma * sigma_data / (sigma ** 2 + sigma_data ** 2).sqrt()


def c_in(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    return 1 / (sigma ** 2 + sigma_data ** 2).sqrt()


def c_noise(sigma: torch.Tensor) -> torch.Tensor:
    return sigma.log() / 4


# --------------------------------------------------------------------------- Table 1, training


def loss_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2: unit loss at every level."""
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def training_sigma(batch: int, p_mean: float, p_std: float, device) -> torch.Tensor:
    """ln(sigma) ~ N(P_mean, P_std^2), drawn from torch's global RNG."""
    return (torch.randn(batch, device=device) * p_std + p_mean).exp()


def training_fraction_above(sigma: float, p_mean: float, p_std: float) -> float:
    """P(sigma_train > sigma) under training_sigma: how much of training sees noise above sigma."""
    return 0.5 * math.erfc((math.log(sigma) - p_mean) / (p_std * math.sqrt(2)))


# --------------------------------------------------------------------------- Eq. 5, sampling grid


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float) -> torch.Tensor:
    """sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, then 0.

    Returns [steps + 1] (float64, decreasing, last entry 0). One step gives [sigma_max, 0].
    """
    i = torch.arange(steps, dtype=torch.float64)
    frac = i / max(steps - 1, 1)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + frac * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


# --------------------------------------------------------------------------- the scheme


class EDM(Diffusion):
    """Preconditioned denoiser D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) and its loss."""

    def __init__(self, cfg: ImagenConfig):
        super().__init__(cfg)
        self.edm: EDMConfig = cfg.diffusion.edm

    def denoise(self, net, x, sigma, text_emb, text_mask, lowres=None, aug_level=None, cond_drop=None):
        sd = self.edm.sigma_data
        s = sigma.to(torch.float32).view(-1, *([1] * (x.dim() - 1)))  # [B, 1, 1, 1]
        f = call_net(net, c_in(s, sd) * x, c_noise(sigma.to(torch.float32)), text_emb, text_mask,
                     lowres, aug_level, cond_drop)
        return c_skip(s, sd) * x + c_out(s, sd) * f

    def scheme_loss(self, net, images, text_emb, text_mask, lowres, aug_level, cond_drop):
        b = images.shape[0]
        sigma = training_sigma(b, self.edm.p_mean, self.edm.p_std, images.device)  # [B]
        noise = torch.randn_like(images) * sigma.view(-1, 1, 1, 1)
        denoised = self.denoise(net, images + noise, sigma, text_emb, text_mask, lowres, aug_level, cond_drop)
        per_sample = (denoised.float() - images).pow(2).flatten(1).mean(1)  # [B]
        return loss_weight(sigma, self.edm.sigma_data) * per_sample

    def sampling_sigmas(self, steps: int) -> torch.Tensor:
        e = self.edm
        return karras_sigmas(steps, e.sigma_min, e.sigma_max, e.rho)

    def prior_std(self, sigma_max: float) -> float:
        # x_T ~ N(0, sigma_max^2 I) (Algorithm 1, line 1)
        return sigma_max

