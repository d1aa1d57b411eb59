"""Log-SNR schedules of continuous-time DDPM, lambda(t) = log(alpha_t^2 / sigma_t^2) for t in [0, 1].

alpha and sigma follow from lambda (alpha^2 = sigmoid(lambda), sigma^2 = sigmoid(-lambda), so
alpha^2 + sigma^2 = 1). Used by the DDPM scheme and by noise conditioning augmentation.
"""
from __future__ import annotations

import math

import torch

LOGSNR_MIN, LOGSNR_MAX = -20.0, 20.0  # the cosine schedule is shifted to span exactly this range
LINEAR_BETA_START, LINEAR_BETA_END, LINEAR_STEPS = 1e-4, 0.02, 1000


def logsnr_cosine(t: torch.Tensor) -> torch.Tensor:
    """Cosine schedule alpha_t = cos(pi t / 2) as log-SNR, -2 log tan(pi t / 2), with t rescaled so
    lambda(0) = LOGSNR_MAX and lambda(1) = LOGSNR_MIN (finite at both ends)."""
    angle_lo = math.atan(math.exp(-0.5 * LOGSNR_MAX))
    angle_hi = math.atan(math.exp(-0.5 * LOGSNR_MIN))
    return -2 * torch.tan(angle_lo + t * (angle_hi - angle_lo)).log()


def logsnr_linear(t: torch.Tensor) -> torch.Tensor:
    """DDPM's linear betas 1e-4..0.02 over 1000 steps in continuous time (Song et al. 2021's VP SDE):
    beta(t) = N (beta_0 + t (beta_1 - beta_0)), so -log alpha_t^2 = N (beta_0 t + (beta_1 - beta_0) t^2 / 2)
    and lambda = -log(expm1(-log alpha_t^2)). Capped at LOGSNR_MAX near t = 0."""
    b0, b1 = LINEAR_BETA_START * LINEAR_STEPS, LINEAR_BETA_END * LINEAR_STEPS
    t = t.double()
    neg_log_alpha2 = b0 * t + 0.5 * (b1 - b0) * t ** 2
    return (-torch.special.expm1(neg_log_alpha2).log()).clamp(max=LOGSNR_MAX).float()


SCHEDULES = {"cosine": logsnr_cosine, "linear": logsnr_linear}


def alpha_sigma(logsnr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha_t = sqrt(sigmoid(lambda)), sigma_t = sqrt(sigmoid(-lambda))."""
    return torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()


