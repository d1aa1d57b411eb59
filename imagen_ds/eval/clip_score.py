"""CLIP score of images against their prompts, with transformers' CLIPModel + CLIPProcessor.

score(image, prompt) = 100 * cos(E_image, E_text) per image, and the reported CLIP score is
max(mean, 0): exactly what torchmetrics' CLIPScore computes (Hessel et al. 2021 with w = 100
in place of 2.5), so it is x100 and clipped at 0. With real CLIP models the cosines of images
and their captions are positive (~0.2-0.35), so the clip never acts in practice. The
processor does the model's own resize (shortest side to its input size, bicubic, centre crop)
and normalisation; prompts longer than the text tower's context are truncated.

The model comes from a local directory or a hub name (`openai/clip-vit-large-patch14`, which
needs the hub cache), or is "clip-tiny-random": a tiny randomly initialised CLIPConfig model
with a byte-level BPE vocabulary written to a temporary directory and loaded back through
`from_pretrained`, the same code path. Its scores measure nothing; they exercise the mechanics.
"""
from __future__ import annotations

import json
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from imagen_ds.errors import ConfigError

TINY_RANDOM = "clip-tiny-random"
DEFAULT_MODEL = "openai/clip-vit-large-patch14"  # torchmetrics' CLIPScore default


class CLIPScorer:
    """`scores(images, prompts) -> [B] float32`: 100 * cos per pair; `clip_score(scores)` reduces."""

    def __init__(self, name_or_path: str = DEFAULT_MODEL, device: str | torch.device = "cpu"):
        from transformers import CLIPModel, CLIPProcessor

        self.name = name_or_path
        path = write_tiny_random_clip(_tiny_dir()) if name_or_path == TINY_RANDOM else name_or_path
        try:
            self.model = CLIPModel.from_pretrained(path).eval().requires_grad_(False)
            self.processor = CLIPProcessor.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise ConfigError("--clip-model", name_or_path,
                              f"cannot load a CLIP model and processor from it ({str(e).splitlines()[0]}); "
                              f"pass a local directory saved with save_pretrained, or '{TINY_RANDOM}'") from None
        self.device = torch.device(device)
        self.model.to(self.device)
        self.context = int(self.model.config.text_config.max_position_embeddings)

    @torch.no_grad()
    def scores(self, images: Sequence, prompts: Sequence[str]) -> torch.Tensor:
        """images: PIL images or uint8 arrays [H,W,3]; prompts: one per image."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        batch = self.processor(text=list(prompts), images=[_as_pil(i) for i in images], return_tensors="pt",
                               padding=True, truncation=True, max_length=self.context)
        out = self.model(**{k: v.to(self.device) for k, v in batch.items()})
        return 100.0 * clip_cosine(out.image_embeds, out.text_embeds).float().cpu()  # [B]


def clip_cosine(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of [B, E] image and text embeddings."""
    return torch.nn.functional.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1)


def clip_score(scores: torch.Tensor) -> float:
    """CLIPScore of a set = max(mean of the per-image 100 * cos, 0), as torchmetrics computes it."""
    return max(float(scores.float().mean()), 0.0)


def _as_pil(image):
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    return Image.fromarray(np.asarray(image, dtype=np.uint8))


# --------------------------------------------------------------------------- the offline tiny model


@lru_cache(maxsize=1)
def _tiny_dir() -> str:
    return tempfile.mkdtemp(prefix="imagen_ds_clip_tiny_")


def _byte_chars() -> list[str]:
    """The 256 printable stand-ins of byte-level BPE (GPT-2/CLIP's bytes-to-unicode table)."""
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(256 - len(keep))]


def write_tiny_random_clip(directory: str | Path, seed: int = 2) -> str:
    """Save a tiny random CLIPModel (32-px images, 32-d towers) and its processor; return the path.

    The tokenizer is a real CLIPTokenizer over a byte-level vocabulary with no merges (every
    byte is a token), written as vocab.json/merges.txt: it needs no download. Seed 2 because
    its random towers give mostly positive cosines, so scores land inside (0, 100) rather than
    at the clip-at-0 floor.
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    out = Path(directory)
    if (out / "config.json").is_file():
        return str(out)
    out.mkdir(parents=True, exist_ok=True)
    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars])}
    bos, eos = len(vocab), len(vocab) + 1
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = bos, eos
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"))
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=bos,
                         eos_token_id=eos, pad_token_id=eos),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    model.save_pretrained(out)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return str(out)
