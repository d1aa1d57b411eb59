"""Up to which noise level a demo image gives its shape's colour away, and how often training goes above it.

Below that level the denoiser can copy the colour from its noisy input; only the draws above it
teach the text -> colour mapping. Usage: python scripts/demo_noise_levels.py [config ...]
"""
from __future__ import annotations

import random
import sys

import numpy as np

from imagen_ds.config import load_config
from imagen_ds.data.synthetic import BACKGROUNDS, COLORS, PALETTE, SHAPES, draw_shape
from imagen_ds.diffusion.edm import training_fraction_above
from imagen_ds.eval.alignment import nearest_color

SIGMAS = (1.0, 2.0, 3.0, 5.0, 8.0, 12.0)


def colour_readable(sigma: float, n: int = 300, seed: int = 0) -> float:
    """Fraction of demo images whose shape colour is the nearest palette colour to the mean of its
    noisy pixels (the shape's pixels known: an upper bound on what the network can read)."""
    rng, pick = np.random.default_rng(seed), random.Random(seed)
    noise = sigma * 127.5  # sigma is in the model's [-1, 1] units; the pixels here are 0..255
    right = total = 0
    for i in range(n):
        c, s, b = pick.choice(COLORS), pick.choice(SHAPES), pick.choice(BACKGROUNDS)
        if c == b:
            continue
        x = np.asarray(draw_shape(c, s, b, seed=i, size=32), dtype=np.float64)
        inside = np.abs(x - np.asarray(PALETTE[b], dtype=np.float64)).sum(-1) > 0.25 * 255
        right += nearest_color((x + noise * rng.standard_normal(x.shape))[inside].mean(0), COLORS) == c
        total += 1
    return right / total


def main(configs: list[str]) -> None:
    heads = [(f"train above: {name} N({e.p_mean}, {e.p_std}^2)", e)
             for name, e in ((n, load_config(n).diffusion.edm) for n in configs)]
    print("sigma  colour readable  " + "  ".join(h for h, _ in heads))
    for sigma in SIGMAS:
        cols = "  ".join(f"{training_fraction_above(sigma, e.p_mean, e.p_std):>{len(h)}.3f}" for h, e in heads)
        print(f"{sigma:5.1f}  {colour_readable(sigma):15.2f}  {cols}")


if __name__ == "__main__":
    main(sys.argv[1:] or ["demo_res_32", "500m_res_64"])
