"""Samplers: plain functions of a denoiser, as in k-diffusion.

Each takes `denoise(x [B, ...], sigma [B]) -> x0 estimate` in the coordinates x = x0 + sigma * n,
the starting sample x (at sigmas[0]) and the decreasing noise levels `sigmas` ([N + 1], last 0),
and returns the final sample. Guidance and thresholding are wrappers of `denoise`
(see guidance.py), so every sampler gets them.
"""
from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm


def _steps(sigmas: torch.Tensor, progress: bool):
    n = len(sigmas) - 1
    return tqdm(range(n), disable=not progress, leave=False)


def _at(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return sigma.expand(x.shape[0])  # scalar -> [B]


def ode_derivative(x, denoised, sigma):
    """dx/dsigma = (x - D(x; sigma)) / sigma (probability-flow ODE, EDM eq. 3 with sigma(t) = t)."""
    return (x - denoised) / sigma


def sample_heun(denoise, x, sigmas, *, progress=False):
    """EDM Algorithm 1: deterministic 2nd-order Heun; the last step (to sigma 0) is plain Euler."""
    for i in _steps(sigmas, progress):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = ode_derivative(x, denoise(x, _at(x, s)), s)
        x_next = x + (s_next - s) * d
        if s_next > 0:  # 2nd-order correction
            d_next = ode_derivative(x_next, denoise(x_next, _at(x, s_next)), s_next)
            x_next = x + (s_next - s) * (d + d_next) / 2
        x = x_next
    return x


def churn_gamma(sigma, steps: int, s_churn: float, s_min: float, s_max: float) -> float:
    """gamma_i = min(S_churn / N, sqrt(2) - 1) inside [S_min, S_max], else 0 (Algorithm 2)."""
    return min(s_churn / steps, math.sqrt(2) - 1) if s_min <= float(sigma) <= s_max else 0.0


def sample_edm_stochastic(denoise, x, sigmas, *, generator, s_churn=0.0, s_min=0.0, s_max=float("inf"),
                          s_noise=1.0, progress=False):
    """EDM Algorithm 2: add noise up to sigma_hat = sigma (1 + gamma), then a Heun step to sigma_next."""
    n = len(sigmas) - 1
    for i in _steps(sigmas, progress):
        s, s_next = sigmas[i], sigmas[i + 1]
        gamma = churn_gamma(s, n, s_churn, s_min, s_max)
        s_hat = s * (1 + gamma)
        if gamma > 0:
            eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) * s_noise
            x = x + (s_hat ** 2 - s ** 2).sqrt() * eps
        d = ode_derivative(x, denoise(x, _at(x, s_hat)), s_hat)
        x_next = x + (s_next - s_hat) * d
        if s_next > 0:
            d_next = ode_derivative(x_next, denoise(x_next, _at(x, s_next)), s_next)
            x_next = x + (s_next - s_hat) * (d + d_next) / 2
        x = x_next
    return x


def ancestral_step(sigma, sigma_next):
    """DDPM posterior q(x_next | x, x0) in these coordinates: x_next = x0 + r^2 (x - x0) + std * n,
    with r = sigma_next / sigma and std^2 = sigma_next^2 (1 - r^2). Returns (r^2, std)."""
    r2 = (sigma_next / sigma) ** 2
    return r2, sigma_next * (1 - r2).clamp(min=0).sqrt()


def sample_ancestral(denoise, x, sigmas, *, generator, progress=False):
    """DDPM ancestral sampling (Ho et al. 2020, with x0 from the denoiser), any number of steps.

    In variance-preserving terms this is z_s ~ q(z_s | z_t, x0_hat) of the continuous-time DDPM
    (Kingma et al. 2021, eq. 33); the final step (sigma_next = 0) returns x0_hat.
    """
    for i in _steps(sigmas, progress):
        s, s_next = sigmas[i], sigmas[i + 1]
        x0 = denoise(x, _at(x, s))
        r2, std = ancestral_step(s, s_next)
        x = x0 + r2 * (x - x0)
        if s_next > 0:
            x = x + std * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x


def sample_ddim(denoise, x, sigmas, *, progress=False):
    """DDIM (Song et al. 2021, eta = 0): keep the predicted noise, move x0 + sigma eps to sigma_next.

    In these coordinates it is the Euler step of the probability-flow ODE.
    """
    for i in _steps(sigmas, progress):
        s, s_next = sigmas[i], sigmas[i + 1]
        x0 = denoise(x, _at(x, s))
        eps = (x - x0) / s
        x = x0 + s_next * eps
    return x
