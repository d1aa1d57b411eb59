"""Image transforms with PIL and NumPy (torchvision does not import beside this torch build).

All resizing that shrinks an image is anti-aliased: PIL's BICUBIC resize widens its kernel
with the scale factor, so down-sampling low-pass filters first (no aliasing of the low-res
conditioning image, which the SR model learns to invert).
"""
from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image

RESAMPLE = Image.Resampling.BICUBIC


def resize_shorter_side(img: Image.Image, side: int) -> Image.Image:
    """Scale so the shorter side equals `side`, keeping the aspect ratio."""
    w, h = img.size
    scale = side / min(w, h)
    size = (max(side, round(w * scale)), max(side, round(h * scale)))
    return img if size == (w, h) else img.resize(size, RESAMPLE, reducing_gap=None)


def crop_box(w: int, h: int, side: int, mode: str, rng: random.Random, step: int = 1) -> tuple[int, int]:
    """Top-left (x, y) of a side x side crop; random offsets are multiples of `step`."""
    if mode == "center":
        return (w - side) // 2 // step * step, (h - side) // 2 // step * step
    return rng.randrange(0, w - side + 1, step), rng.randrange(0, h - side + 1, step)


def square_crop(img: Image.Image, side: int, mode: str, rng: random.Random) -> Image.Image:
    """Resize the shorter side to `side`, then a centre or random side x side crop."""
    img = resize_shorter_side(img, side)
    x, y = crop_box(*img.size, side, mode, rng)
    return img.crop((x, y, x + side, y + side))


def downsample(img: Image.Image, side: int) -> Image.Image:
    """Anti-aliased square down-sampling (the SR low-res input)."""
    return img.resize((side, side), RESAMPLE, reducing_gap=None)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """uint8 RGB PIL -> float32 [3, H, W] in [-1, 1]. NumPy, not torch ops: single-threaded and
    free of OpenMP start-up cost, which dominates for small images on busy cores."""
    arr = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)            # [3, H, W]
    out = np.empty(arr.shape, dtype=np.float32)
    np.multiply(arr, np.float32(1 / 127.5), out=out, casting="unsafe")
    out -= 1.0
    return torch.from_numpy(out)


def model_views(img: Image.Image, resolution: int, lowres: int | None, train_crop: int | None,
                crop: str, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The training views of one image: (image [3,S,S], low-res [3,s,s] or None).

    Base model: resolution crop. SR model: the crop, and its anti-aliased down-sample to the
    low-res side. With train_crop (the 1024 scheme): a random train_crop-px window of the
    full-res crop and the matching window of its low-res version; the window offset is a
    multiple of the scale factor, so both windows cover exactly the same scene.
    """
    full = square_crop(img, resolution, crop, rng)
    if lowres is None:
        return to_tensor(full), None
    small = downsample(full, lowres)
    if train_crop is None or train_crop == resolution:
        return to_tensor(full), to_tensor(small)
    k = resolution // lowres                    # hi-res pixels per low-res pixel
    x, y = crop_box(resolution, resolution, train_crop, "random", rng, step=k)
    s = train_crop // k
    hi = full.crop((x, y, x + train_crop, y + train_crop))
    lo = small.crop((x // k, y // k, x // k + s, y // k + s))
    return to_tensor(hi), to_tensor(lo)
