"""Sampled tensors -> PNG files: one image per prompt and a grid."""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> [B, H, W, 3] uint8."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round()
    return x.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images: torch.Tensor, cols: Optional[int] = None, pad: int = 2) -> Image.Image:
    """Tile B images in rows of `cols` (default: about square), separated by `pad` white pixels."""
    pix = to_uint8(images)
    b, h, w, _ = pix.shape
    cols = cols or math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(b):
        r, c = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[y:y + h, x:x + w] = pix[i]
    return Image.fromarray(grid)


def slug(text: str, max_len: int = 48) -> str:
    """A file-name-safe version of a prompt."""
    s = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
    return s[:max_len] or "prompt"


def save_images(images: torch.Tensor, out_dir: str | Path, prompts: Sequence[str], start: int = 0) -> list[Path]:
    """One PNG per image, named NNNN_<prompt slug>.png with NNNN = start + index."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (arr, prompt) in enumerate(zip(to_uint8(images), prompts)):
        path = out / f"{start + i:04d}_{slug(prompt)}.png"
        Image.fromarray(arr).save(path)
        paths.append(path)
    return paths
