"""The demo's text-alignment checker reads the synthetic generator's own images back correctly,
so its verdict on model samples means something."""
import random

import numpy as np
import pytest
import torch

from imagen_ds.data.synthetic import COLORS, SHAPES, all_combos, caption, draw_shape
from imagen_ds.eval.alignment import alignment_scores, check, parse_caption, read_image


def _generator_images(n, size, seed):
    rng = random.Random(seed)
    combos = all_combos()
    picks = [combos[rng.randrange(len(combos))] for _ in range(n)]
    return [draw_shape(*c, seed=rng.randrange(2**31), size=size) for c in picks], picks


@pytest.fixture(scope="module")
def images32():
    return _generator_images(300, 32, seed=1)


def test_reads_generator_images_at_demo_resolution(images32):
    images, picks = images32
    s = alignment_scores(images, [caption(*c) for c in picks])
    assert s["n"] == 300
    assert s["color_accuracy"] >= 0.98
    assert s["background_accuracy"] >= 0.98
    assert s["shape_accuracy"] >= 0.9


def test_reads_64px_images_too():
    images, picks = _generator_images(60, 64, seed=2)
    s = alignment_scores(images, [caption(*c) for c in picks])
    assert s["color_accuracy"] >= 0.98 and s["shape_accuracy"] >= 0.9


def test_rejects_wrong_captions(images32):
    images, picks = images32
    rng = random.Random(3)
    wrong_color, wrong_shape = [], []
    for img, (c, s, b) in zip(images[:100], picks[:100]):
        other_c = rng.choice([x for x in COLORS if x not in (c, b)])
        other_s = rng.choice([x for x in SHAPES if x != s])
        wrong_color.append(check(img, caption(other_c, s, b))["color_ok"])
        wrong_shape.append(check(img, caption(c, other_s, b))["shape_ok"])
    assert sum(wrong_color) <= 2
    assert sum(wrong_shape) <= 10


def test_model_tensors_in_unit_range_read_like_images_even_with_noise(images32):
    # samples come out of the diffusion model as [3,H,W] tensors in [-1,1], never perfectly clean
    images, picks = images32
    g = torch.Generator().manual_seed(0)
    tensors = []
    for img in images[:100]:
        t = torch.tensor(np.asarray(img), dtype=torch.float32).permute(2, 0, 1) / 127.5 - 1  # [3,H,W]
        tensors.append(t + 0.15 * torch.randn(t.shape, generator=g))
    s = alignment_scores(tensors, [caption(*c) for c in picks[:100]])
    assert s["color_accuracy"] >= 0.98 and s["shape_accuracy"] >= 0.9


def test_an_image_of_another_colour_fails_the_colour_check():
    red = draw_shape("red", "circle", "black", seed=0, size=32)
    assert read_image(red).color == "red"
    assert check(red, "a red circle on a black background")["color_ok"]
    assert not check(red, "a green circle on a black background")["color_ok"]
    assert not check(red, "a red triangle on a black background")["shape_ok"]


def test_non_demo_caption_is_refused():
    assert parse_caption("a red circle on a blue background") == ("red", "circle", "blue")
    with pytest.raises(ValueError):
        parse_caption("a photo of a corgi")
