"""Image transforms with PIL and NumPy (torchvision does not import beside this torch build).

All resizing that shrinks an image is anti-aliased: PIL's BICUBIC resize widens its kernel
with the scale factor, so down-sampling low-pass filters first (no aliasing of the low-res
conditioning image, which the SR model learns to invert). The low-res view is resized from the
source pixels directly, not from the high-res view (one resampling, not two).
"""
from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image

RESAMPLE = Image.Resampling.BICUBIC


def crop_box(w: int, h: int, side: int, mode: str, rng: random.Random, step: int = 1) -> tuple[int, int]:
    """Top-left (x, y) of a side x side crop; random offsets are multiples of `step`."""
    if mode == "center":
        return (w - side) // 2 // step * step, (h - side) // 2 // step * step
    return rng.randrange(0, w - side + 1, step), rng.randrange(0, h - side + 1, step)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """uint8 RGB PIL -> float32 [3, H, W] in [-1, 1]. NumPy, not torch ops: single-threaded and
    free of OpenMP start-up cost, which dominates for small images on busy cores."""
    arr = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)            # [3, H, W]
    out = np.empty(arr.shape, dtype=np.float32)
    np.multiply(arr, np.float32(1 / 127.5), out=out, casting="unsafe")
    out -= 1.0
    return torch.from_numpy(out)


def square_region(w: int, h: int, side: int, mode: str, rng: random.Random) -> tuple[float, float, float]:
    """The centre/random square kept when the shorter side is scaled to `side`: (x0, y0, size) in
    source pixels. Random offsets are whole pixels of the scaled image."""
    scale = side / min(w, h)
    x, y = crop_box(max(side, round(w * scale)), max(side, round(h * scale)), side, mode, rng)
    return x / scale, y / scale, side / scale


def model_views(img: Image.Image, resolution: int, lowres: int | None, train_crop: int | None,
                crop: str, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The training views of one image: (image [3,S,S], low-res [3,s,s] or None).

    Base model: a centre/random square of the image at `resolution`. SR model: also the same
    square at the low-res side. With train_crop (the 1024 scheme): a random train_crop-px window
    of that square, and the matching window of its low-res version; the window offset is a
    multiple of the scale factor, so both windows cover exactly the same scene.

    Every view is one anti-aliased resize of a source region (PIL's `box`), equal to resizing
    the whole image and cropping, without resampling the pixels that would be thrown away.
    """
    x0, y0, size = square_region(*img.size, resolution, crop, rng)
    if train_crop is not None and lowres is not None and train_crop < resolution:
        k = resolution // lowres                    # hi-res pixels per low-res pixel
        x, y = crop_box(resolution, resolution, train_crop, "random", rng, step=k)
        unit = size / resolution                    # source pixels per hi-res pixel
        x0, y0, size, side = x0 + x * unit, y0 + y * unit, train_crop * unit, train_crop
    else:
        side = resolution
    w, h = img.size  # rounding of the resized grid may overshoot by a fraction of a pixel
    size = min(size, w, h)
    x0, y0 = min(max(0.0, x0), w - size), min(max(0.0, y0), h - size)
    box = (x0, y0, x0 + size, y0 + size)
    image = to_tensor(img.resize((side, side), RESAMPLE, box=box, reducing_gap=None))
    if lowres is None:
        return image, None
    small = side * lowres // resolution
    return image, to_tensor(img.resize((small, small), RESAMPLE, box=box, reducing_gap=None))
