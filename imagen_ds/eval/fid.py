"""FID through torchmetrics' FrechetInceptionDistance, with any feature network behind it.

Feature networks all share torchmetrics' interface: `net(images uint8 [B,3,H,W]) -> [B,d]`.
- Inception-v3 (the FID standard): torch-fidelity's TF-ported network, 2048-d pool features,
  weights from a local file (`--inception-weights pt_inception-2015-12-05-6726825d.pth`);
  it resizes every image to 299x299 itself (bilinear, antialiased).
- "tiny-random": a small randomly initialised conv net (seed 0). It measures nothing about
  image quality; it exists so tests and offline demos run the same code path.
- any other `nn.Module` passed from Python.

The reference ("real") statistics are kept across `reset_fake()`, so one pass over the
reference set serves a whole checkpoint x guidance sweep.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from imagen_ds.errors import ConfigError

TINY_RANDOM = "tiny-random"
INCEPTION_DIM = 2048


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """d^2 = |mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), in float64.

    This is torchmetrics' own computation (the one FrechetInceptionDistance.compute runs: the
    trace of the matrix square root as the sum of square roots of the eigenvalues of
    sigma1 @ sigma2), exposed so it can be checked against scipy.linalg.sqrtm.
    """
    from torchmetrics.image.fid import _compute_fid

    d = _compute_fid(mu1.double(), sigma1.double(), mu2.double(), sigma2.double())
    return float(d)


class TinyRandomFeatures(nn.Module):
    """uint8 [B,3,H,W] -> [B,64]: three random strided convs, global average pooled."""

    num_features = 64

    def __init__(self, seed: int = 0):
        super().__init__()
        # fork_rng: building it must not move the caller's global RNG
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.body = nn.Sequential(
                nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.SiLU(),
                nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.SiLU(),
                nn.Conv2d(64, self.num_features, 3, stride=2, padding=1),
            )
        self.eval().requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 127.5 - 1.0                          # [B, 3, H, W] in [-1, 1]
        x = nn.functional.interpolate(x, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
        return self.body(x).mean(dim=(2, 3))                      # [B, 64]


class FID:
    """Accumulates reference and generated images (uint8 [B,3,H,W]) and returns the FID."""

    def __init__(self, feature_net: Optional[nn.Module] = None, *, inception_weights: Optional[str] = None,
                 device: str | torch.device = "cpu"):
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.device = torch.device(device)
        if feature_net is None and inception_weights == TINY_RANDOM:
            feature_net = TinyRandomFeatures()
        if feature_net is not None:
            self.description = (f"{TINY_RANDOM} conv net (random weights, seed 0; mechanics only, not comparable "
                                "to published FID)" if isinstance(feature_net, TinyRandomFeatures)
                                else f"custom feature network {type(feature_net).__name__}")
            feature = feature_net.to(self.device)
            kwargs = {}
        else:
            feature, kwargs = INCEPTION_DIM, _inception_kwargs(inception_weights)
            self.description = ("Inception-v3 (torch-fidelity TF port, 2048-d pool3), weights "
                                f"{inception_weights or 'pt_inception-2015-12-05 (torch-fidelity download)'}")
        # normalize=False: every network receives uint8 images, as torch-fidelity's Inception expects
        make = lambda: FrechetInceptionDistance(feature=feature, reset_real_features=False, normalize=False,
                                                **kwargs)
        if feature_net is not None:
            self.metric = make()
        else:
            self.metric = _load_inception(make, inception_weights)
        self.metric = self.metric.to(self.device)

    @torch.no_grad()
    def add_real(self, images: torch.Tensor) -> None:
        self.metric.update(_check_uint8(images).to(self.device), real=True)

    @torch.no_grad()
    def add_fake(self, images: torch.Tensor) -> None:
        self.metric.update(_check_uint8(images).to(self.device), real=False)

    @property
    def num_real(self) -> int:
        return int(self.metric.real_features_num_samples)

    @property
    def num_fake(self) -> int:
        return int(self.metric.fake_features_num_samples)

    def compute(self) -> float:
        if self.num_real < 2 or self.num_fake < 2:
            raise ConfigError("FID", "images", f"needs at least 2 reference and 2 generated images, "
                              f"got {self.num_real} and {self.num_fake}")
        return max(float(self.metric.compute()), 0.0)  # a squared distance; below 0 only by rounding

    def reset_fake(self) -> None:
        self.metric.reset()  # reset_real_features=False keeps the reference statistics

    # The reference statistics are sums, so a cached copy restores them exactly.
    def real_state(self) -> dict[str, torch.Tensor]:
        m = self.metric
        return {"sum": m.real_features_sum.cpu(), "cov_sum": m.real_features_cov_sum.cpu(),
                "n": m.real_features_num_samples.cpu()}

    def load_real_state(self, state: dict[str, torch.Tensor]) -> None:
        m = self.metric
        if state["sum"].shape != m.real_features_sum.shape:
            raise ValueError("cached reference statistics have another feature width")
        m.real_features_sum = state["sum"].to(m.real_features_sum)
        m.real_features_cov_sum = state["cov_sum"].to(m.real_features_cov_sum)
        m.real_features_num_samples = state["n"].to(m.real_features_num_samples)


def _load_inception(make, weights: Optional[str]):
    try:
        return make()
    except ModuleNotFoundError as e:
        raise ConfigError("--inception-weights", weights or "<default>",
                          f"the Inception-v3 FID network needs torch-fidelity ({e}); "
                          "`pip install torch-fidelity`, or pass --inception-weights tiny-random "
                          "for a mechanics-only run") from None
    except (OSError, RuntimeError) as e:
        raise ConfigError("--inception-weights", weights or "<default>",
                          f"cannot load the Inception-v3 weights ({e}); pass a local "
                          "pt_inception-2015-12-05-6726825d.pth") from None


def _inception_kwargs(weights: Optional[str]) -> dict:
    if weights is None:
        return {}  # torch-fidelity downloads its default weights (needs network access)
    if not Path(weights).is_file():
        raise ConfigError("--inception-weights", weights,
                          "no such file; expected torch-fidelity's pt_inception-2015-12-05-6726825d.pth "
                          f"or '{TINY_RANDOM}'")
    return {"feature_extractor_weights_path": str(weights)}


def _check_uint8(images: torch.Tensor) -> torch.Tensor:
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"FID expects uint8 images [B,3,H,W], got {images.dtype} {tuple(images.shape)}")
    return images
