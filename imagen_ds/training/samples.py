"""A grid of samples from fixed prompts with the EMA weights, saved as PNG (and sent to W&B)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def image_grid(images: torch.Tensor, cols: int | None = None) -> np.ndarray:
    """[N, 3, H, W] in [-1, 1] -> one uint8 [rows*H, cols*W, 3] image."""
    n, _, h, w = images.shape
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = -(-n // cols)
    grid = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    pix = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    pix = pix.permute(0, 2, 3, 1).cpu().numpy()
    for i in range(n):
        r, c = divmod(i, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = pix[i]
    return grid


class SampleGrid:
    def __init__(self, cfg, diffusion, out_dir: Path, device: torch.device, n: int = 8):
        self.cfg, self.diffusion, self.out_dir, self.device, self.n = cfg, diffusion, Path(out_dir), device, n
        self.prompts = None
        self.captions: list[str] = []
        self._net = None

    def remember(self, batch: dict) -> None:
        n = min(self.n, batch["text_emb"].shape[0])
        self.prompts = {k: batch[k][:n].to(self.device) for k in ("text_emb", "text_mask", "lowres", "image")
                        if k in batch}
        self.captions = list(batch.get("caption", [""] * n))[:n]

    @torch.no_grad()
    def make(self, ema, step: int) -> Path:
        from PIL import Image

        from imagen_ds.models import build_model

        p = self.prompts
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # building and sampling must not shift the training RNG
            if self._net is None:
                self._net = build_model(self.cfg).to(self.device).eval()
            ema.copy_to(self._net)
            g = torch.Generator(device=self.device).manual_seed(0)
            images = self.diffusion.sample(self._net, p["text_emb"], p["text_mask"], p.get("lowres"),
                                           shape=tuple(p["image"].shape), generator=g)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"step_{step:08d}.png"
        Image.fromarray(image_grid(images)).save(path)
        return path
