"""Every sampler, driven by the exact denoiser of a known Gaussian, must reproduce that Gaussian.

For data x0 ~ N(mu, diag(s^2)) the optimal denoiser has a closed form at every noise level. We
express it as the RAW network output each scheme's parametrisation expects (EDM: F with
D = c_skip x + c_out F(c_in x; ln(sigma)/4); DDPM: epsilon or v for z = alpha x0 + sigma eps with
noise_cond = -logsnr/8), so the real preconditioning, schedule, guidance wrapper and sampler all run.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from imagen_ds.config import config_from_dict
from imagen_ds.diffusion import build_diffusion


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on 2 shared cores, 2 OpenMP threads run these small tensors ~50x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


SHAPE = (3, 2, 1)  # 6 dimensions, each its own mean and std
N_SAMPLES = 6000
# well inside [-1, 1] (beyond 2.8 std): the final clamp of sample() must not bend the statistics
MU = torch.linspace(-0.1, 0.1, 6).view(SHAPE)
STD = torch.linspace(0.22, 0.32, 6).view(SHAPE)


def tiny_cfg(scheme: str, **diffusion):
    """A minimal valid config: only the diffusion and sampling sections matter here."""
    return config_from_dict({
        "name": f"gaussian_{scheme}",
        "model": dict(unet="UNet", resolution=2, lowres_resolution=None, in_channels=3, base_channels=32,
                      channel_mults=[1], num_res_blocks=[1], attention_resolutions=[], attention_type="fused",
                      mid_attention=False, head_dim=32, num_heads=None, cond_dim=32, dropout=0.0,
                      resblock_updown=False, null_text="zero", checkpoint_activations=False),
        "text": dict(encoder="t5-tiny-random", dim=8, max_tokens=4),
        "diffusion": dict(scheme=scheme, **diffusion),
        "training": dict(micro_batch=1, global_batch=1, precision="fp32", samples=1),
        "sampling": dict(sampler="heun" if scheme == "edm" else "ancestral"),
    })


def posterior_mean_ve(x, sigma):
    """E[x0 | x0 + sigma n = x] for the Gaussian: mu + s^2 / (s^2 + sigma^2) (x - mu)."""
    return MU + STD ** 2 / (STD ** 2 + sigma ** 2) * (x - MU)


class GaussianEDMNet(nn.Module):
    """Raw F such that the EDM preconditioner yields the optimal denoiser."""

    sigma_data = 0.5

    def forward(self, x_in, noise_cond, text_emb, text_mask, lowres=None, aug_level=None, cond_drop=None):
        sigma = (4 * noise_cond.double()).exp().view(-1, 1, 1, 1)  # inverts c_noise = ln(sigma)/4
        sd2 = self.sigma_data ** 2
        x = x_in.double() * (sigma ** 2 + sd2).sqrt()  # inverts c_in
        d = posterior_mean_ve(x, sigma)
        c_skip, c_out = sd2 / (sigma ** 2 + sd2), sigma * self.sigma_data / (sigma ** 2 + sd2).sqrt()
        return ((d - c_skip * x) / c_out).float()


class GaussianDDPMNet(nn.Module):
    """Raw epsilon or v for z = alpha x0 + sigma eps, from the exact E[x0 | z]."""

    def __init__(self, prediction: str):
        super().__init__()
        self.prediction = prediction

    def forward(self, z, noise_cond, text_emb, text_mask, lowres=None, aug_level=None, cond_drop=None):
        logsnr = (-8 * noise_cond.double()).view(-1, 1, 1, 1)
        alpha, sigma = torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()
        z = z.double()
        x0 = MU + alpha * STD ** 2 / (alpha ** 2 * STD ** 2 + sigma ** 2) * (z - alpha * MU)
        eps = (z - alpha * x0) / sigma
        out = eps if self.prediction == "eps" else alpha * eps - sigma * x0
        return out.float()


def draw(scheme_cfg, net, sampling, seed=0):
    diffusion = build_diffusion(scheme_cfg)
    text_emb = torch.zeros(N_SAMPLES, 4, 8)
    text_mask = torch.ones(N_SAMPLES, 4, dtype=torch.bool)
    sampling = dataclasses.replace(scheme_cfg.sampling, **sampling)
    return diffusion.sample(net, text_emb, text_mask, shape=(N_SAMPLES, *SHAPE), sampling=sampling,
                            generator=torch.Generator().manual_seed(seed))


def assert_matches_gaussian(x):
    mean, std = x.mean(0), x.std(0)
    # 5% of each dimension's std for the mean (mu may be ~0), 5% relative for the std
    assert ((mean - MU).abs() / STD).max() < 0.05, ((mean - MU) / STD)
    assert ((std / STD) - 1).abs().max() < 0.05, std / STD


# (name, config, sampler settings): guidance 1 and no thresholding, so the exact denoiser is used as is
CASES = [
    ("edm-heun", dict(scheme="edm"), dict(sampler="heun", steps=64)),
    ("edm-stochastic", dict(scheme="edm"),
     dict(sampler="stochastic", steps=128, s_churn=40, s_min=0.05, s_max=50, s_noise=1.003)),
    # DDPM's uniform-t grid and first-order steps need many more steps than EDM's Heun on the Karras grid
    ("ddpm-cosine-eps-ancestral", dict(scheme="ddpm"), dict(sampler="ancestral", steps=500)),
    ("ddpm-cosine-eps-ddim", dict(scheme="ddpm"), dict(sampler="ddim", steps=250)),
    ("ddpm-linear-v-ddim", dict(scheme="ddpm", ddpm=dict(schedule="linear", prediction="v")),
     dict(sampler="ddim", steps=250)),
]


@pytest.mark.parametrize("name,diffusion,sampling", CASES, ids=[c[0] for c in CASES])
def test_sampler_reproduces_gaussian(name, diffusion, sampling):
    torch.manual_seed(0)
    cfg = tiny_cfg(**diffusion)
    net = GaussianEDMNet() if cfg.diffusion.scheme == "edm" else GaussianDDPMNet(cfg.diffusion.ddpm.prediction)
    x = draw(cfg, net, dict(sampling, guidance=1.0, threshold="none"))
    assert x.shape == (N_SAMPLES, *SHAPE)
    assert_matches_gaussian(x)


def test_too_few_ancestral_steps_underestimate_the_spread():
    """Sanity check that the test can fail: 3 ancestral steps with a point-estimate x0 lose variance."""
    cfg = tiny_cfg("ddpm")
    x = draw(cfg, GaussianDDPMNet("eps"), dict(sampler="ancestral", steps=3, guidance=1.0, threshold="none"))
    assert (x.std(0) / STD).mean() < 0.9
