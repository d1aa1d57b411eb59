"""What an evaluation reads: the prompts file and the reference images (folder or shards).

Prompts file (`--prompts`), by extension:
- `.txt`: one prompt per line (blank lines skipped);
- `.jsonl`: one object per line with a "caption" (or "prompt" / "text") field;
- `.json`: a list of strings, or a COCO captions file (`captions_val2014.json`): its
  "annotations" list, one prompt per caption.

Reference images (`--ref-images`): a folder searched recursively for .png/.jpg/.jpeg/.webp/.bmp,
or webdataset shards (a folder of .tar files, a glob, a brace pattern `data-{000..009}.tar`, or a
single .tar); each sample's first image entry is used.

Every image, reference or generated, goes to the FID network as uint8 [3,S,S]: centre-cropped to
a square and resized to S with PIL bicubic (generated images already are S x S).
"""
from __future__ import annotations

import glob
import io
import json
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from PIL import Image

from imagen_ds.errors import ConfigError, DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# --------------------------------------------------------------------------- prompts


def read_prompts(path: str | Path) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError("--prompts", str(p), "no such file")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix == ".jsonl":
            prompts = [_caption_of(json.loads(line), p) for line in text.splitlines() if line.strip()]
        elif p.suffix == ".json":
            prompts = _prompts_from_json(json.loads(text), p)
        else:
            prompts = [line.strip() for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise ConfigError("--prompts", str(p), f"not valid JSON ({e})") from None
    if not prompts:
        raise ConfigError("--prompts", str(p), "holds no prompts")
    return prompts


def _prompts_from_json(obj, p: Path) -> list[str]:
    if isinstance(obj, dict) and isinstance(obj.get("annotations"), list):  # COCO captions file
        return [a["caption"].strip() for a in obj["annotations"]]
    if isinstance(obj, list):
        return [x.strip() if isinstance(x, str) else _caption_of(x, p) for x in obj]
    raise ConfigError("--prompts", str(p), "expected a JSON list of prompts or a COCO captions file")


def _caption_of(record, p: Path) -> str:
    if isinstance(record, dict):
        for key in ("caption", "prompt", "text"):
            if isinstance(record.get(key), str):
                return record[key].strip()
    raise ConfigError("--prompts", str(p), f"a record has no 'caption', 'prompt' or 'text' string: {record!r:.80}")


def select_prompts(prompts: list[str], num_samples: Optional[int], seed: int) -> list[str]:
    """The prompt of each generated image.

    None: every prompt once, in file order. Fewer than the file holds: a random subset drawn with
    `seed` (COCO FID-30K: 30k random captions of the val set). More: the prompts cycled.
    """
    if num_samples is None or num_samples == len(prompts):
        return list(prompts)
    if num_samples < 1:
        raise ConfigError("--num-samples", str(num_samples), "must be >= 1")
    if num_samples < len(prompts):
        idx = np.random.default_rng(seed).choice(len(prompts), size=num_samples, replace=False)
        return [prompts[i] for i in idx]
    return [prompts[i % len(prompts)] for i in range(num_samples)]


# --------------------------------------------------------------------------- images


def to_square_uint8(image: Image.Image, size: int) -> torch.Tensor:
    """PIL image -> uint8 [3, size, size]: centre crop to a square, PIL bicubic resize."""
    image = image.convert("RGB")
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if side != size:
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def reference_sources(ref: str) -> tuple[str, list[Path]]:
    """("folder", image files) or ("shards", .tar files) for a --ref-images value."""
    p = Path(ref)
    if p.is_dir():
        tars = sorted(p.glob("*.tar"))
        if tars:
            return "shards", tars
        files = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"{ref}: no images (.png/.jpg/.jpeg/.webp/.bmp) and no .tar shards found")
        return "folder", files
    if p.suffix == ".tar" and p.is_file():
        return "shards", [p]
    pattern = _expand_braces(ref)
    tars = sorted({Path(f) for pat in pattern for f in glob.glob(pat)})
    if not tars:
        raise ConfigError("--ref-images", ref, "no such folder, and no .tar shards match it")
    return "shards", tars


def iter_reference_images(ref: str, size: int, batch_size: int,
                          max_images: Optional[int] = None) -> Iterator[torch.Tensor]:
    """uint8 batches [B, 3, size, size] of the reference set, in a fixed order."""
    kind, sources = reference_sources(ref)
    images = _folder_images(sources) if kind == "folder" else _shard_images(sources)
    batch, count = [], 0
    for image in images:
        if max_images is not None and count >= max_images:
            break
        batch.append(to_square_uint8(image, size))
        count += 1
        if len(batch) == batch_size:
            yield torch.stack(batch)
            batch = []
    if batch:
        yield torch.stack(batch)


def _folder_images(files: list[Path]) -> Iterator[Image.Image]:
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                yield im
        except OSError as e:
            raise DataError(f"{f}: cannot read the reference image ({e})") from None


def _shard_images(tars: list[Path]) -> Iterator[Image.Image]:
    import webdataset as wds

    for tar in tars:
        ds = wds.WebDataset(str(tar), shardshuffle=False, empty_check=False)
        for sample in ds:
            key = next((k for k in sample if k.lower().rsplit(".", 1)[-1] in
                        ("jpg", "jpeg", "png", "webp", "bmp")), None)
            if key is None:
                continue  # a sample without an image (e.g. embeddings only)
            try:
                with Image.open(io.BytesIO(sample[key])) as im:
                    im.load()
                    yield im
            except OSError as e:
                raise DataError(f"{tar}: sample {sample.get('__key__')}: cannot decode {key} ({e})") from None


def _expand_braces(pattern: str) -> list[str]:
    """'a-{000..002}.tar' -> ['a-000.tar', 'a-001.tar', 'a-002.tar'] (also {x,y} lists)."""
    import braceexpand

    return list(braceexpand.braceexpand(pattern))


def load_png_uint8(path: Path) -> torch.Tensor:
    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)


def save_png(image: torch.Tensor, path: Path) -> None:
    """image: float [3, H, W] in [-1, 1] -> 8-bit PNG (written atomically: no half files on resume)."""
    arr = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    tmp = path.with_suffix(".tmp.png")
    Image.fromarray(arr).save(tmp)
    tmp.replace(path)
