"""Synthetic captioned data for the offline demo: coloured shapes on coloured backgrounds.

Captions read "a {color} {shape} on a {background} background". Some colour/shape/background
combinations are held out (never drawn for training) so the demo can test whether the model
composes words it has seen only separately; they are listed in DIR/heldout.json.
"""
from __future__ import annotations

import io
import json
import random
from itertools import product
from pathlib import Path
from typing import Optional

from PIL import Image, ImageDraw

from imagen_ds.data.format import encode_json

# Colours far apart in RGB so a 32-px sample is classifiable by its mean colour.
PALETTE = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (35, 65, 225),
    "yellow": (240, 225, 30),
    "magenta": (215, 40, 215),
    "cyan": (30, 215, 225),
    "orange": (245, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}
COLORS = ("red", "green", "blue", "yellow", "magenta", "cyan", "orange", "white")
BACKGROUNDS = ("black", "gray", "white", "blue")
SHAPES = ("circle", "square", "triangle")
SUPERSAMPLE = 4  # draw 4x larger, then shrink: anti-aliased edges


def caption(color: str, shape: str, background: str) -> str:
    return f"a {color} {shape} on a {background} background"


def all_combos() -> list[tuple[str, str, str]]:
    """Every (color, shape, background) with the shape visible (colour != background)."""
    return [(c, s, b) for c, s, b in product(COLORS, SHAPES, BACKGROUNDS) if c != b]


def heldout_combos(seed: int = 0, fraction: float = 0.1) -> list[tuple[str, str, str]]:
    """Combinations kept out of training.

    Each held-out triple keeps all three of its pairs (color+shape, color+background,
    shape+background) in training, so every held-out caption is a new composition of parts
    the model has seen together.
    """
    combos = all_combos()
    order = combos[:]
    random.Random(seed).shuffle(order)
    train = set(combos)
    held: list[tuple[str, str, str]] = []
    target = max(1, round(fraction * len(combos)))
    for c, s, b in order:
        if len(held) == target:
            break
        rest = train - {(c, s, b)}
        if (any(x[:2] == (c, s) for x in rest) and any((x[0], x[2]) == (c, b) for x in rest)
                and any(x[1:] == (s, b) for x in rest)):
            train, held = rest, held + [(c, s, b)]
    return sorted(held)


def draw_shape(color: str, shape: str, background: str, seed: int, size: int = 64) -> Image.Image:
    """One RGB image: a shape of random size and position (from `seed`) on a flat background."""
    rng = random.Random(seed)
    big = size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), PALETTE[background])
    draw = ImageDraw.Draw(img)
    side = rng.uniform(0.35, 0.65) * big
    x0 = rng.uniform(0.05 * big, 0.95 * big - side)
    y0 = rng.uniform(0.05 * big, 0.95 * big - side)
    box = (x0, y0, x0 + side, y0 + side)
    fill = PALETTE[color]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(x0 + side / 2, y0), (x0, y0 + side), (x0 + side, y0 + side)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return img.resize((size, size), Image.Resampling.BOX)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def make_demo_data(out: str | Path, n: int, *, seed: int = 0, size: int = 64, shard_size: int = 1000,
                   heldout_fraction: float = 0.1, encoder: Optional[str] = "t5-tiny-random",
                   max_tokens: int = 64, progress: bool = False) -> dict:
    """Write n training samples as shards OUT/000000.tar, ... and OUT/heldout.json.

    With `encoder` set, the samples carry precached embeddings (ready for training);
    `encoder=None` writes images and captions only. Returns a summary dict.
    """
    from imagen_ds.data.shards import write_tar

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    held = heldout_combos(seed, heldout_fraction)
    train = [c for c in all_combos() if c not in set(held)]
    rng = random.Random(seed)
    enc = None
    if encoder:
        from imagen_ds.text.encoders import load_encoder
        from imagen_ds.text.precache import embed_samples
        enc = load_encoder(encoder)
    shards = []
    bar = _progress(n, progress, "make-demo-data")
    for start in range(0, n, shard_size):
        samples = []
        for i in range(start, min(n, start + shard_size)):
            color, shape, bg = train[rng.randrange(len(train))]
            img = draw_shape(color, shape, bg, seed=rng.randrange(2**31), size=size)
            meta = {"width": size, "height": size, "source": f"synthetic/{i:08d}",
                    "color": color, "shape": shape, "background": bg}
            samples.append({"__key__": f"{i:08d}", "png": _png(img),
                            "txt": caption(color, shape, bg).encode(), "json": encode_json(meta)})
        if enc is not None:
            samples, _ = embed_samples(samples, enc, max_tokens)
        path = out / f"{start // shard_size:06d}.tar"
        write_tar(path, samples)
        shards.append(str(path))
        bar.update(len(samples))
    bar.close()
    summary = {
        "n": n, "seed": seed, "size": size, "shards": len(shards), "encoder": encoder,
        "colors": list(COLORS), "shapes": list(SHAPES), "backgrounds": list(BACKGROUNDS),
        "train_combos": len(train),
        "heldout": [{"color": c, "shape": s, "background": b, "caption": caption(c, s, b)} for c, s, b in held],
    }
    (out / "heldout.json").write_text(json.dumps(summary, indent=2))
    return summary


def _progress(total: int, enabled: bool, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="img", disable=not enabled)


def photo_like(width: int, height: int, seed: int) -> Image.Image:
    """A photo-like test image: smooth coloured waves plus fine noise (JPEG-compresses like a photo)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    chans = [np.sin(2 * np.pi * (rng.uniform(1, 6) * x + rng.uniform(1, 6) * y) + rng.uniform(0, 6))
             for _ in range(3)]
    arr = np.stack(chans, -1) * 0.4 + 0.5 + rng.normal(0, 0.08, (height, width, 3))
    return Image.fromarray((arr.clip(0, 1) * 255).astype(np.uint8))


def write_photo_folder(out: str | Path, n: int, *, min_side: int = 384, max_side: int = 640, seed: int = 0) -> None:
    """n photo-like JPEGs of random size with same-named .txt captions: input for prepare-data benchmarks."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(n):
        w, h = rng.randint(min_side, max_side), rng.randint(min_side, max_side)
        photo_like(w, h, seed=rng.randrange(2**31)).save(out / f"{i:06d}.jpg", quality=90)
        (out / f"{i:06d}.txt").write_text(f"a photo number {i} of colourful waves with some texture")
