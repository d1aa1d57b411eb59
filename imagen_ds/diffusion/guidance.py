"""Classifier-free guidance and x0 thresholding, as wrappers of a denoiser (x, sigma) -> x0.

Guidance on x0 equals guidance on epsilon at the same x (the two are affine in each other), so the
wrapper is scheme-agnostic. Thresholding acts on the guided x0, as in Imagen section 2.3.
"""
from __future__ import annotations

import torch
from torch import Tensor


def classifier_free_guidance(raw_denoise, cond: dict, weight: float):
    """Mix D_uncond + w (D_cond - D_uncond) (Ho & Salimans 2022, Imagen's w; w = 1 is conditional).

    raw_denoise(x, sigma, cond_drop=None, **cond) -> x0. Conditional and unconditional halves run
    in ONE batched call: x, sigma and every tensor of `cond` are doubled, and the second half has
    cond_drop = True so the net uses its null text embedding.
    """
    if weight == 1.0:
        return lambda x, sigma: raw_denoise(x, sigma, **cond)

    doubled = {k: (torch.cat([v, v]) if isinstance(v, Tensor) else v) for k, v in cond.items()}

    def denoise(x, sigma):
        b = x.shape[0]
        drop = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)]).to(x.device)
        both = raw_denoise(torch.cat([x, x]), torch.cat([sigma, sigma]), cond_drop=drop, **doubled)
        d_cond, d_uncond = both.chunk(2)
        return d_uncond + weight * (d_cond - d_uncond)

    return denoise


def dynamic_threshold(x0: Tensor, percentile: float = 0.995) -> Tensor:
    """Imagen's dynamic thresholding: s = max(percentile of |x0| per sample, 1); x0 -> clip(x0, -s, s) / s.

    Samples already inside [-1, 1] get s = 1 and are returned unchanged.
    """
    s = row_quantile(x0.abs().flatten(1).float(), percentile).clamp(min=1.0).to(x0.dtype)  # [B]
    s = s.view(-1, *([1] * (x0.dim() - 1)))
    return torch.maximum(torch.minimum(x0, s), -s) / s


def row_quantile(v: Tensor, q: float) -> Tensor:
    """torch.quantile(v, q, dim=1) (linear interpolation) without its 16M-element input limit."""
    srt = v.sort(dim=1).values  # [B, N]
    pos = q * (srt.shape[1] - 1)
    lo = int(pos)
    hi = min(lo + 1, srt.shape[1] - 1)
    return srt[:, lo] + (pos - lo) * (srt[:, hi] - srt[:, lo])


def static_threshold(x0: Tensor) -> Tensor:
    """Clip x0 to the data range [-1, 1]."""
    return x0.clamp(-1, 1)


def thresholded(denoise, mode: str, percentile: float = 0.995):
    """Wrap a denoiser so its x0 is thresholded: mode 'dynamic' | 'static' | 'none'."""
    if mode == "none":
        return denoise
    if mode == "static":
        return lambda x, sigma: static_threshold(denoise(x, sigma))
    if mode == "dynamic":
        return lambda x, sigma: dynamic_threshold(denoise(x, sigma), percentile)
    raise ValueError(f"unknown threshold mode {mode!r}; expected dynamic, static or none")
