"""Deterministic text-alignment check for the synthetic shapes demo.

The demo's captions read "a {color} {shape} on a {background} background". From an image this
module reads back the background colour (median of the border ring), the foreground colour
(nearest palette colour to the pixels that differ most from the background) and the shape
(which of circle / square / triangle, drawn in the foreground's bounding box, overlaps the
foreground mask best), then compares them with the caption. No learned weights: the same image
always gets the same verdict, so accuracies of samples mean something (the tests check the
reader on the generator's own images).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from imagen_ds.data.synthetic import BACKGROUNDS, COLORS, PALETTE, SHAPES

TEMPLATE_SUPERSAMPLE = 4  # shape templates are drawn 4x larger, then box-filtered (anti-aliased)


@dataclass(frozen=True)
class Reading:
    """What the checker sees in one image."""

    color: str        # foreground colour name (one of COLORS)
    shape: str        # one of SHAPES
    background: str   # background colour name (one of BACKGROUNDS)
    contrast: float   # RGB distance between the foreground and background estimates (0..441)


# --------------------------------------------------------------------------- image -> array


def to_rgb_array(image) -> np.ndarray:
    """PIL image, uint8 [H,W,3] array or float tensor/array [3,H,W] in [-1,1] -> float [H,W,3] in 0..255."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64)
    if hasattr(image, "detach"):  # torch tensor, [3,H,W] in [-1, 1]
        image = image.detach().float().cpu().numpy()
    a = np.asarray(image)
    if a.dtype == np.uint8:
        return a.astype(np.float64)
    if a.ndim == 3 and a.shape[0] == 3 and a.shape[-1] != 3:
        a = a.transpose(1, 2, 0)
    return (np.clip(a.astype(np.float64), -1.0, 1.0) + 1.0) * 127.5


def nearest_color(rgb: np.ndarray, names: Sequence[str]) -> str:
    """Palette name (among `names`) closest in RGB to one colour."""
    d = [np.linalg.norm(rgb - np.asarray(PALETTE[n], dtype=np.float64)) for n in names]
    return names[int(np.argmin(d))]


# --------------------------------------------------------------------------- the three readings


def border_background(img: np.ndarray) -> np.ndarray:
    """Median colour of the 1-px border ring: the generator keeps shapes 5% away from the edges."""
    ring = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])  # [4S-4, 3]
    return np.median(ring, axis=0)


def foreground_color(img: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """Median colour of the quarter of pixels farthest from the background (the shape's core,
    not its anti-aliased edge, which mixes both colours)."""
    dist = np.linalg.norm(img - bg, axis=-1).ravel()
    pixels = img.reshape(-1, 3)
    k = max(1, dist.size // 16)  # the smallest shape covers ~1/16 of the image
    core = np.argsort(dist)[-k:]
    return np.median(pixels[core], axis=0)


def foreground_mask(img: np.ndarray, bg: np.ndarray, fg: np.ndarray) -> np.ndarray:
    """Pixels closer to the foreground colour than to the background, largest 4-connected blob."""
    d_bg = np.linalg.norm(img - bg, axis=-1)
    d_fg = np.linalg.norm(img - fg, axis=-1)
    return largest_component(d_fg < d_bg)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask (drops speckles of noisy samples)."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    best, best_size, current = 0, 0, 0
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        current += 1
        labels[y0, x0] = current
        stack, size = [(y0, x0)], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = current
                    stack.append((ny, nx))
        if size > best_size:
            best, best_size = current, size
    return labels == best if best else mask


def shape_template(shape: str, height: int, width: int) -> np.ndarray:
    """Coverage [h, w] in 0..1 of `shape` filling an h x w box, drawn as the generator draws it
    (upright triangle with its apex at the top centre)."""
    s = TEMPLATE_SUPERSAMPLE
    img = Image.new("L", (width * s, height * s), 0)
    draw = ImageDraw.Draw(img)
    x1, y1 = width * s - 1, height * s - 1
    if shape == "circle":
        draw.ellipse((0, 0, x1, y1), fill=255)
    elif shape == "square":
        draw.rectangle((0, 0, x1, y1), fill=255)
    elif shape == "triangle":
        draw.polygon([(x1 / 2, 0), (0, y1), (x1, y1)], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return np.asarray(img.resize((width, height), Image.Resampling.BOX), dtype=np.float64) / 255.0


def classify_shape(mask: np.ndarray) -> str:
    """The shape whose template, drawn in the mask's bounding box, has the highest IoU with it."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return SHAPES[0]
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    box = mask[y0:y1, x0:x1].astype(np.float64)
    scores = {}
    for shape in SHAPES:
        t = shape_template(shape, y1 - y0, x1 - x0) >= 0.5
        scores[shape] = (box * t).sum() / np.maximum(box + t - box * t, 0).sum()  # IoU
    return max(SHAPES, key=lambda s: scores[s])


def read_image(image) -> Reading:
    """Background, foreground colour and shape of one image (any format `to_rgb_array` takes)."""
    img = to_rgb_array(image)  # [H, W, 3] in 0..255
    bg = border_background(img)
    background = nearest_color(bg, BACKGROUNDS)
    fg = foreground_color(img, bg)
    color = nearest_color(fg, [c for c in COLORS if c != background] or COLORS)
    shape = classify_shape(foreground_mask(img, bg, fg))
    return Reading(color, shape, background, float(np.linalg.norm(fg - bg)))


# --------------------------------------------------------------------------- captions and scores


def parse_caption(caption: str) -> tuple[str, str, str]:
    """'a red circle on a blue background' -> ('red', 'circle', 'blue')."""
    words = caption.strip().lower().split()
    if len(words) != 7 or words[0] != "a" or words[3:5] != ["on", "a"] or words[6] != "background":
        raise ValueError(f"not a demo caption ('a COLOR SHAPE on a BACKGROUND background'): {caption!r}")
    color, shape, background = words[1], words[2], words[5]
    if color not in COLORS or shape not in SHAPES or background not in BACKGROUNDS:
        raise ValueError(f"caption {caption!r} names a colour, shape or background the demo does not draw")
    return color, shape, background


def check(image, caption: str) -> dict:
    """Does the image show what the caption says? Per-attribute verdicts plus the reading."""
    color, shape, background = parse_caption(caption)
    r = read_image(image)
    return {"caption": caption, "read": asdict(r), "color_ok": r.color == color,
            "shape_ok": r.shape == shape, "background_ok": r.background == background}


def alignment_scores(images: Iterable, captions: Sequence[str]) -> dict:
    """Colour, shape and background accuracy of images against their captions.

    Also returns the per-image verdicts and how often each colour was read, which shows a
    collapsed (always the same colour) sampler at a glance.
    """
    results = [check(img, cap) for img, cap in zip(images, captions)]
    if len(results) != len(captions):
        raise ValueError(f"{len(results)} images for {len(captions)} captions")
    n = max(1, len(results))
    return {
        "n": len(results),
        "color_accuracy": sum(r["color_ok"] for r in results) / n,
        "shape_accuracy": sum(r["shape_ok"] for r in results) / n,
        "background_accuracy": sum(r["background_ok"] for r in results) / n,
        "colors_read": dict(Counter(r["read"]["color"] for r in results).most_common()),
        "results": results,
    }


def chance_color_accuracy(captions: Sequence[str]) -> float:
    """Expected colour accuracy of a reader guessing uniformly among the colours that can show
    on each caption's background: the bar an unconditional model should sit near."""
    odds = [1.0 / len([c for c in COLORS if c != parse_caption(cap)[2]]) for cap in captions]
    return sum(odds) / max(1, len(odds))
