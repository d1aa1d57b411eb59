"""Evaluation: FID and CLIP-score mechanics, and the whole `imagen-ds evaluate` sweep offline.

The Inception and CLIP networks are replaced by randomly initialised tiny ones that go through
the same code paths (torchmetrics' FrechetInceptionDistance with a custom feature module; a
CLIPConfig model saved and loaded with from_pretrained); no weights are downloaded.
"""
import json
import math

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from imagen_ds.eval.clip_score import CLIPScorer, clip_score, write_tiny_random_clip
from imagen_ds.eval.fid import FID, TinyRandomFeatures, frechet_distance
from imagen_ds.eval.inputs import iter_reference_images, read_prompts, select_prompts


def scipy_frechet(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def shapes_images(n, size=32, seed=0):
    """uint8 [n,3,size,size]: coloured rectangles on coloured backgrounds (image-like, not noise)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size, 3), np.uint8)
    for k in range(n):
        out[k] = rng.integers(0, 256, 3)
        x0, y0 = rng.integers(0, size // 2, 2)
        w, h = rng.integers(size // 4, size // 2, 2)
        out[k, y0:y0 + h, x0:x0 + w] = rng.integers(0, 256, 3)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------- FID


def test_frechet_distance_matches_scipy_sqrtm_on_gaussian_features():
    rng = np.random.default_rng(0)
    d = 24
    a = rng.normal(size=(500, d)) @ rng.normal(size=(d, d)) + 0.5
    b = rng.normal(size=(400, d)) @ rng.normal(size=(d, d)) * 0.7 - 0.2
    mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    expected = scipy_frechet(mu1, s1, mu2, s2)
    got = frechet_distance(*(torch.from_numpy(v) for v in (mu1, s1, mu2, s2)))
    assert got == pytest.approx(expected, rel=1e-4)
    assert frechet_distance(*(torch.from_numpy(v) for v in (mu1, s1, mu1, s1))) == pytest.approx(0, abs=1e-6 * expected)


class Flatten(torch.nn.Module):
    """A feature 'network' that is the pixels themselves: FID becomes a closed form on them."""

    num_features = 12  # 3 x 2 x 2 pixels

    def forward(self, images):
        return images.flatten(1).float()  # [B, 3*H*W]


def test_fid_statistics_are_those_of_the_features():
    rng = np.random.default_rng(1)
    real = np.clip(rng.normal(128, 30, size=(300, 3, 2, 2)), 0, 255).astype(np.uint8)
    fake = np.clip(rng.normal(110, 40, size=(200, 3, 2, 2)), 0, 255).astype(np.uint8)
    fid = FID(Flatten())
    for chunk in np.array_split(real, 7):   # batching must not matter
        fid.add_real(torch.from_numpy(chunk))
    fid.add_fake(torch.from_numpy(fake))
    r, f = real.reshape(300, -1).astype(np.float64), fake.reshape(200, -1).astype(np.float64)
    expected = scipy_frechet(r.mean(0), np.cov(r, rowvar=False), f.mean(0), np.cov(f, rowvar=False))
    assert fid.compute() == pytest.approx(expected, rel=1e-4)
    assert (fid.num_real, fid.num_fake) == (300, 200)


def test_fid_of_a_set_against_itself_is_zero_and_grows_with_a_shift():
    images = shapes_images(64)
    fid = FID(inception_weights="tiny-random")
    fid.add_real(images)
    values = []
    for shift in (0, 20, 50, 100):
        fid.reset_fake()  # the reference statistics stay
        fid.add_fake((images.int() + shift).clamp(0, 255).to(torch.uint8))
        values.append(fid.compute())
    assert values[0] < 1e-6 * values[1]
    assert values[1] < values[2] < values[3]
    assert fid.num_real == 64


# --------------------------------------------------------------------------- CLIP score


def test_clip_score_mechanics_and_agreement_with_clip_logits(tmp_path):
    path = write_tiny_random_clip(tmp_path / "clip")
    scorer = CLIPScorer(str(path))
    images = shapes_images(6, size=40, seed=3)
    prompts = [f"a {c} square on a {b} background" for c, b in
               [("red", "blue"), ("green", "white"), ("yellow", "black"), ("blue", "red"), ("white", "green"),
                ("black", "yellow")]]
    hwc = [im.permute(1, 2, 0).numpy() for im in images]
    s = scorer.scores(hwc, prompts)
    assert s.shape == (6,) and s.dtype == torch.float32
    assert torch.all(s.abs() <= 100)
    assert torch.equal(s, CLIPScorer("clip-tiny-random").scores(hwc, prompts))  # the named tiny model = seed 2
    shuffled = scorer.scores(hwc, prompts[1:] + prompts[:1])
    assert not torch.allclose(s, shuffled)                       # the score depends on the pairing
    assert 0 < clip_score(s) <= 100
    assert clip_score(-s.abs()) == 0.0                           # a negative mean is clipped at 0

    # the same numbers as CLIP's own image-text logits (logit_scale * cos), rescaled to x100
    batch = scorer.processor(text=prompts, images=hwc, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = scorer.model(**batch).logits_per_image                # [images, texts]
    expected = 100 * logits.diagonal() / scorer.model.logit_scale.exp()
    assert torch.allclose(s, expected, atol=1e-4)


# --------------------------------------------------------------------------- inputs


def test_prompt_files_and_reference_folder_or_shards_agree(tmp_path):
    import webdataset as wds

    (tmp_path / "p.txt").write_text("a red circle\n\na blue square\n")
    (tmp_path / "p.jsonl").write_text('{"caption": "a red circle"}\n{"prompt": "a blue square"}\n')
    (tmp_path / "coco.json").write_text(json.dumps(
        {"images": [], "annotations": [{"image_id": 1, "caption": "a red circle "},
                                       {"image_id": 1, "caption": "a blue square"}]}))
    for name in ("p.txt", "p.jsonl", "coco.json"):
        assert read_prompts(tmp_path / name) == ["a red circle", "a blue square"]
    many = [f"prompt {i}" for i in range(100)]
    subset = select_prompts(many, 30, seed=5)
    assert len(set(subset)) == 30 and subset == select_prompts(many, 30, seed=5) != select_prompts(many, 30, 6)
    assert select_prompts(many[:3], 7, seed=0) == many[:3] * 2 + many[:1]

    folder = tmp_path / "ref"
    folder.mkdir()
    images = shapes_images(5, size=48, seed=7)
    with wds.TarWriter(str(tmp_path / "shard-000.tar")) as tar:
        for i, im in enumerate(images):
            pil = Image.fromarray(im.permute(1, 2, 0).numpy()).crop((0, 0, 48, 40))  # not square
            pil.save(folder / f"{i:03d}.png")
            tar.write({"__key__": f"{i:03d}", "png": pil, "txt": "x"})
    from_folder = torch.cat(list(iter_reference_images(str(folder), 32, batch_size=2)))
    from_shards = torch.cat(list(iter_reference_images(str(tmp_path / "shard-{000..000}.tar"), 32, batch_size=3)))
    assert from_folder.shape == (5, 3, 32, 32) and from_folder.dtype == torch.uint8
    assert torch.equal(from_folder, from_shards)


# --------------------------------------------------------------------------- the whole command


def export_untrained(path, cfg, seed):
    """An inference file as `imagen-ds export` writes it (weights + config metadata), for an
    untrained net whose zero-initialised output layers are perturbed so samples depend on
    the weights, the prompt and the guidance weight."""
    from safetensors.torch import save_file

    from imagen_ds.models import build_model

    torch.manual_seed(seed)
    net = build_model(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sd = {k: v.detach().contiguous().clone() for k, v in net.state_dict().items()}
    save_file(sd, str(path), metadata={"config": json.dumps(cfg.to_dict()), "ema": "true", "format": "imagen_ds"})
    return str(path)


def write_inputs(tmp_path, size, n_ref=8):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on a blue background\na green square on a white background\n"
                       "a yellow triangle on a black background\na blue circle on a red background\n")
    ref = tmp_path / "ref"
    ref.mkdir()
    for i, im in enumerate(shapes_images(n_ref, size=size, seed=11)):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(ref / f"{i}.png")
    return str(prompts), str(ref)


def evaluate(*args):
    from click.testing import CliRunner

    from imagen_ds.cli import main

    return CliRunner().invoke(main, ["evaluate", "--inception-weights", "tiny-random", "--clip-model",
                                     "clip-tiny-random", "--device", "cpu", "--batch-size", "4", *args])


def test_evaluate_sweeps_checkpoints_and_guidance_and_resumes(tmp_path):
    from imagen_ds.config import load_config

    cfg = load_config("tiny_res_32")
    a = export_untrained(tmp_path / "run_a.safetensors", cfg, seed=0)
    b = export_untrained(tmp_path / "run_b.safetensors", cfg, seed=1)
    prompts, ref = write_inputs(tmp_path, 32)
    out = tmp_path / "eval"
    args = ["--checkpoints", f"{a},{b}", "--prompts", prompts, "--ref-images", ref, "--guidance", "1,4",
            "--steps", "2", "--out", str(out)]

    first = evaluate(*args)
    assert first.exit_code == 0, first.output
    results = json.loads((out / "results.json").read_text())
    rows = results["results"]
    assert [(r["label"], r["guidance"]) for r in rows] == [("run_a", 1), ("run_a", 4), ("run_b", 1), ("run_b", 4)]
    for r in rows:
        assert math.isfinite(r["fid"]) and r["fid"] >= 0 and 0 <= r["clip_score"] <= 100
        assert r["num_images"] == 4
        assert len(list((out / "samples" / r["label"] / f"g{r['guidance']:g}").glob("*.png"))) == 4
    assert len({r["fid"] for r in rows}) == 4  # weights and guidance change the samples
    proto = results["protocol"]
    assert proto["num_images"] == 4 and proto["image_size"] == 32
    assert proto["clip"]["scale"] == 100 and proto["clip"]["clipped_at_zero"]
    assert proto["fid"]["num_reference"] == 8 and "tiny-random" in proto["fid"]["feature_network"]
    assert "heun 2 steps" in proto["sampling"]
    table = (out / "results.md").read_text()
    assert "| checkpoint | guidance | FID" in table and table.count("| run_") == 4
    assert "x100" in table and "8 reference images" in table
    with Image.open(out / "fid_vs_clip.png") as plot:
        assert plot.size[0] > 300 and plot.size[1] > 200
    assert "FID" in first.output and "wrote" in first.output

    pngs = sorted((out / "samples").rglob("*.png"))
    stamps = [p.stat().st_mtime_ns for p in pngs]
    second = evaluate(*args)
    assert second.exit_code == 0, second.output
    again = json.loads((out / "results.json").read_text())
    assert again["generated_this_run"] == 0 and results["generated_this_run"] == 16
    assert [p.stat().st_mtime_ns for p in pngs] == stamps
    assert [r["fid"] for r in again["results"]] == [r["fid"] for r in rows]

    # other sampling settings into the same folder would mix stale images: one-line error
    stale = evaluate(*[x if x != "2" else "3" for x in args])
    assert stale.exit_code == 2 and "new --out" in stale.output


def test_evaluate_cascade_base_then_sr(tmp_path):
    from imagen_ds.config import load_config

    base_cfg = load_config("tiny_res_32").replace(model={"resolution": 16, "attention_resolutions": (8, 4)})
    base = export_untrained(tmp_path / "base16.safetensors", base_cfg, seed=0)
    sr = export_untrained(tmp_path / "sr64.safetensors", load_config("tiny_sr_64"), seed=2)
    prompts, ref = write_inputs(tmp_path, 64, n_ref=4)
    out = tmp_path / "eval"
    result = evaluate("--checkpoints", base, "--sr256", sr, "--prompts", prompts, "--ref-images", ref,
                      "--guidance", "2", "--num-samples", "2", "--steps", "2", "--out", str(out))
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["protocol"]["image_size"] == 64 and "sr256 64px" in results["protocol"]["sampling"]
    with Image.open(out / "samples" / "base16" / "g2" / "000001.png") as im:
        assert im.size == (64, 64)
    # the SR model given as the swept checkpoint is refused with one line
    wrong = evaluate("--checkpoints", sr, "--prompts", prompts, "--ref-images", ref, "--guidance", "2",
                     "--out", str(tmp_path / "x"))
    assert wrong.exit_code == 2 and "super-resolution" in wrong.output
    # a reference folder without images stops before any sampling, not after it
    (tmp_path / "empty").mkdir()
    empty = evaluate("--checkpoints", base, "--prompts", prompts, "--ref-images", str(tmp_path / "empty"),
                     "--out", str(tmp_path / "y"))
    assert empty.exit_code == 2 and "no images" in empty.output and not (tmp_path / "y" / "samples").exists()
