"""Diffusion: EDM and DDPM formulas against hand values, guidance and thresholding, seeds, training on
the real tiny U-Net, super-resolution sampling with both schemes, the cascade and `imagen-ds sample`."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from imagen_ds.config import load_config
from imagen_ds.diffusion import build_diffusion, edm
from imagen_ds.diffusion.cascade import Stage, sample_cascade
from imagen_ds.diffusion.ddpm import alpha_sigma, logsnr_cosine, logsnr_linear
from imagen_ds.diffusion.guidance import classifier_free_guidance, dynamic_threshold, static_threshold
from imagen_ds.errors import ConfigError
from imagen_ds.models import build_model


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on 2 shared cores, 2 OpenMP threads run these small tensors ~50x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def ddpm_cfg(cfg, sampler="ancestral", **ddpm):
    """The same config with the continuous DDPM scheme (one YAML key away)."""
    return cfg.replace(diffusion={"scheme": "ddpm", "ddpm": dataclasses.replace(cfg.diffusion.ddpm, **ddpm)},
                       sampling={"sampler": sampler})


def text(b, cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(b, 8, cfg.text.dim, generator=g)  # [B, T, D]
    mask = torch.zeros(b, 8, dtype=torch.bool)
    mask[:, :5] = True
    return emb, mask


def untrained(cfg):
    """The real network with its zero-initialised output layers jittered, so every input matters
    (a freshly built U-Net outputs exactly 0 whatever it is given)."""
    torch.manual_seed(0)
    net = build_model(cfg).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return net


@pytest.fixture(scope="module")
def base():
    cfg = load_config("tiny_res_32")
    return untrained(cfg), cfg


# --------------------------------------------------------------------------- EDM formulas


@pytest.mark.parametrize("sigma,c_skip,c_out,c_in,c_noise,weight", [
    # hand-computed with sigma_data = 0.5
    (0.5, 0.5, 0.353553, 1.414214, -0.173287, 8.0),
    (1.0, 0.2, 0.447214, 0.894427, 0.0, 5.0),
    (80.0, 3.90610e-5, 0.499990, 0.0124998, 1.095508, 4.000156),
])
def test_edm_preconditioning_matches_hand_values(sigma, c_skip, c_out, c_in, c_noise, weight):
    s = torch.tensor(sigma, dtype=torch.float64)
    assert edm.c_skip(s, 0.5).item() == pytest.approx(c_skip, rel=1e-4)
    assert edm.c_out(s, 0.5).item() == pytest.approx(c_out, rel=1e-4)
    assert edm.c_in(s, 0.5).item() == pytest.approx(c_in, rel=1e-4)
    assert edm.c_noise(s).item() == pytest.approx(c_noise, abs=1e-5)
    assert edm.loss_weight(s, 0.5).item() == pytest.approx(weight, rel=1e-4)


def test_edm_sampling_grid_and_training_noise():
    sig = edm.karras_sigmas(3, 0.002, 80.0, 7.0)
    # middle: ((80^(1/7) + 0.002^(1/7)) / 2)^7 = 2.51522; then 0.002 and a final 0
    assert sig.tolist() == pytest.approx([80.0, 2.51522, 0.002, 0.0], rel=1e-4)
    torch.manual_seed(0)
    log_sigma = edm.training_sigma(200_000, -1.2, 1.2, "cpu").log()
    assert log_sigma.mean().item() == pytest.approx(-1.2, abs=0.01)
    assert log_sigma.std().item() == pytest.approx(1.2, abs=0.01)
    for sigma in (0.1, 1.0, 3.0):  # the tail formula agrees with the draws it describes
        drawn = (log_sigma.exp() > sigma).float().mean().item()
        assert edm.training_fraction_above(sigma, -1.2, 1.2) == pytest.approx(drawn, abs=0.005)
    assert edm.training_fraction_above(3.0, -1.2, 1.2) == pytest.approx(0.0277, abs=1e-3)


# --------------------------------------------------------------------------- DDPM schedules


@pytest.mark.parametrize("schedule", [logsnr_cosine, logsnr_linear])
def test_ddpm_logsnr_is_monotone_and_variance_preserving(schedule):
    t = torch.linspace(0, 1, 1001)
    lam = schedule(t)
    assert torch.isfinite(lam).all()
    assert (lam[1:] < lam[:-1]).all()  # strictly decreasing: more noise at later t
    alpha, sigma = alpha_sigma(lam)
    assert torch.allclose(alpha ** 2 + sigma ** 2, torch.ones_like(t), atol=1e-6)


def test_ddpm_schedules_match_their_definitions():
    # cosine: alpha_t = cos(pi t / 2) away from the clipped ends, symmetric around t = 0.5
    t = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)
    alpha, _ = alpha_sigma(logsnr_cosine(t))
    assert alpha.tolist() == pytest.approx(torch.cos(math.pi * t / 2).tolist(), abs=1e-3)
    assert logsnr_cosine(torch.tensor([0.0, 1.0])).tolist() == pytest.approx([20.0, -20.0], abs=1e-2)
    # linear: the discrete DDPM's alpha_bar = prod(1 - beta_i), betas 1e-4..0.02 over 1000 steps
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    alpha_bar = torch.cumprod(1 - betas, 0)
    for i in (100, 500, 1000):
        discrete = math.log(alpha_bar[i - 1] / (1 - alpha_bar[i - 1]))
        assert logsnr_linear(torch.tensor([i / 1000])).item() == pytest.approx(discrete, abs=0.08)


# --------------------------------------------------------------------------- guidance, thresholding


def test_guidance_mixes_conditional_and_unconditional_in_one_call(base):
    net, cfg = base
    d = build_diffusion(cfg)
    emb, mask = text(3, cfg)
    torch.manual_seed(1)
    x, sigma = torch.randn(3, 3, 32, 32), torch.tensor([0.3, 2.0, 10.0])
    calls = []

    def raw(x, sigma, cond_drop=None, **c):
        calls.append(x.shape[0])
        return d.denoise(net, x, sigma, cond_drop=cond_drop, **c)

    with torch.no_grad():
        cond = d.denoise(net, x, sigma, emb, mask)
        uncond = d.denoise(net, x, sigma, emb, mask, cond_drop=torch.ones(3, dtype=torch.bool))
        w1 = classifier_free_guidance(raw, {"text_emb": emb, "text_mask": mask}, 1.0)(x, sigma)
        w5 = classifier_free_guidance(raw, {"text_emb": emb, "text_mask": mask}, 5.0)(x, sigma)
    assert not torch.allclose(cond, uncond)  # dropping the text changes the prediction
    assert torch.allclose(w1, cond, atol=1e-5)
    assert torch.allclose(w5, uncond + 5 * (cond - uncond), atol=1e-4)
    assert calls == [3, 6]  # weight 1: conditional only; otherwise one batched call of both halves


def test_dynamic_threshold_keeps_in_range_and_bounds_the_rest():
    torch.manual_seed(0)
    inside = torch.rand(2, 3, 8, 8) * 2 - 1
    assert torch.equal(dynamic_threshold(inside), inside)
    big = torch.linspace(-3, 3, 192).view(1, 3, 8, 8)
    out = dynamic_threshold(torch.cat([big, inside[:1]]))
    assert out.abs().max() <= 1
    assert torch.equal(out[1], inside[0])  # per-sample: the in-range sample is untouched
    s = torch.quantile(big.abs().flatten(), 0.995)
    assert torch.allclose(out[0], big[0] / s, atol=1e-5)  # rescaled, not saturated: order is kept
    assert torch.equal(static_threshold(big), big.clamp(-1, 1))


class ConstantX0Net(torch.nn.Module):
    """Raw output whose preconditioned x0 is always `target`, in the scheme's own parametrisation."""

    def __init__(self, target, scheme):
        super().__init__()
        self.target, self.scheme = target, scheme

    def forward(self, x, noise_cond, text_emb, text_mask, lowres=None, aug_level=None, cond_drop=None):
        p = self.target.expand_as(x)
        if self.scheme == "edm":
            sigma = (4 * noise_cond).exp().view(-1, 1, 1, 1)
            x_ve = x * (sigma ** 2 + 0.25).sqrt()
            return (p - edm.c_skip(sigma, 0.5) * x_ve) / edm.c_out(sigma, 0.5)
        alpha, sigma = alpha_sigma((-8 * noise_cond).view(-1, 1, 1, 1))
        return (x - alpha * p) / sigma  # epsilon


@pytest.mark.parametrize("sampler", ["heun", "stochastic", "ancestral", "ddim"])
@pytest.mark.parametrize("scheme", ["edm", "ddpm"])
def test_every_sampler_applies_dynamic_thresholding(base, scheme, sampler):
    _, cfg = base
    cfg = cfg if scheme == "edm" else ddpm_cfg(cfg)
    target = torch.linspace(-2, 2, 3 * 32 * 32).view(1, 3, 32, 32)
    net = ConstantX0Net(target, scheme)
    emb, mask = text(2, cfg)
    sampling = dataclasses.replace(cfg.sampling, sampler=sampler, steps=3, guidance=1.0, s_churn=10)
    out = {th: build_diffusion(cfg).sample(net, emb, mask, shape=(2, 3, 32, 32), generator=torch.Generator().manual_seed(0),
                                           sampling=dataclasses.replace(sampling, threshold=th))
           for th in ("dynamic", "none")}
    s = torch.quantile(target.abs().flatten(), 0.995)  # ~1.99: x0 is clipped there, then divided by it
    assert torch.allclose(out["dynamic"], (target.clamp(-s, s) / s).expand(2, -1, -1, -1), atol=1e-3)
    assert torch.allclose(out["none"], target.clamp(-1, 1).expand(2, -1, -1, -1), atol=1e-3)


# --------------------------------------------------------------------------- seeds


@pytest.mark.parametrize("scheme,sampler", [("edm", "stochastic"), ("ddpm", "ancestral")])
def test_same_seed_same_images_other_seed_other_images(base, scheme, sampler):
    net, cfg = base
    cfg = cfg if scheme == "edm" else ddpm_cfg(cfg)
    d = build_diffusion(cfg)
    emb, mask = text(2, cfg)
    sampling = dataclasses.replace(cfg.sampling, sampler=sampler, steps=2, s_churn=10)
    rng_before = torch.get_rng_state()

    def draw(seed):
        return d.sample(net, emb, mask, shape=(2, 3, 32, 32), sampling=sampling,
                        generator=torch.Generator().manual_seed(seed))

    a, b, c = draw(0), draw(0), draw(1)
    assert torch.equal(a, b)
    assert (a - c).abs().mean() > 0.01
    assert a.min() >= -1 and a.max() <= 1
    assert torch.equal(torch.get_rng_state(), rng_before)  # sampling leaves the training RNG alone


# --------------------------------------------------------------------------- training


def toy_images(b):
    """Coloured squares on grey: something a few dozen steps can start to learn."""
    g = torch.Generator().manual_seed(0)
    x = torch.full((b, 3, 32, 32), -0.5)
    for i in range(b):
        r, c = torch.randint(0, 16, (2,), generator=g).tolist()
        x[i, :, r:r + 16, c:c + 16] = torch.rand(3, 1, 1, generator=g) * 2 - 1
    return x


@pytest.mark.parametrize("scheme", ["edm", "ddpm"])
def test_loss_decreases_on_tiny_unet(scheme):
    cfg = load_config("tiny_res_32")
    cfg = cfg if scheme == "edm" else ddpm_cfg(cfg)
    torch.manual_seed(0)
    net = build_model(cfg)
    d = build_diffusion(cfg)
    images = toy_images(4)
    emb, mask = text(4, cfg)

    def fixed_noise_loss():  # same noise levels and noise every time: a fair before/after comparison
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(123)
            return torch.stack([d.training_loss(net, images, emb, mask).mean() for _ in range(2)]).mean().item()

    before = fixed_noise_loss()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    for _ in range(15):
        loss = d.training_loss(net, images, emb, mask)
        assert loss.shape == (4,) and loss.dtype == torch.float32
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
    after = fixed_noise_loss()
    assert after < 0.8 * before, (before, after)


def test_training_loss_is_reproducible_from_the_global_rng(base):
    net, cfg = base
    d = build_diffusion(cfg)
    images, (emb, mask) = toy_images(2), text(2, cfg)
    with torch.no_grad():
        torch.manual_seed(5)
        a = d.training_loss(net, images, emb, mask)
        torch.manual_seed(5)
        b = d.training_loss(net, images, emb, mask)
    assert torch.equal(a, b)


# --------------------------------------------------------------------------- super-resolution, cascade


@pytest.fixture(scope="module")
def sr64():
    cfg = load_config("tiny_sr_64")
    return untrained(cfg), cfg


@pytest.mark.parametrize("scheme", ["edm", "ddpm"])
def test_sr_model_trains_and_samples_with_both_schemes(sr64, scheme):
    net, cfg = sr64
    cfg = cfg if scheme == "edm" else ddpm_cfg(cfg, sampler="ddim")
    d = build_diffusion(cfg)
    emb, mask = text(2, cfg)
    lowres = torch.rand(2, 3, 16, 16) * 2 - 1
    torch.manual_seed(0)
    loss = d.training_loss(net, torch.rand(2, 3, 64, 64) * 2 - 1, emb, mask, lowres)
    assert loss.shape == (2,) and torch.isfinite(loss).all()
    with pytest.raises(ValueError, match="lowres"):
        d.training_loss(net, torch.rand(2, 3, 64, 64), emb, mask)
    sampling = dataclasses.replace(cfg.sampling, steps=2)
    out = {a: d.sample(net, emb, mask, lowres, shape=(2, 3, 64, 64), sampling=sampling, aug_level=a,
                       generator=torch.Generator().manual_seed(0)) for a in (0.0, 0.5)}
    assert out[0.0].shape == (2, 3, 64, 64) and torch.isfinite(out[0.0]).all()
    assert not torch.equal(out[0.0], out[0.5])  # the augmentation level reaches the network


@pytest.mark.parametrize("scheme", ["edm", "ddpm"])
def test_cascade_base_then_sr(base, scheme):
    net, cfg = base
    sr_cfg = load_config("tiny_effsr_128")  # 32 -> 128, the 1024 model's Efficient U-Net layout
    if scheme == "ddpm":
        cfg, sr_cfg = ddpm_cfg(cfg), ddpm_cfg(sr_cfg, sampler="ddim")
    sr_net = untrained(sr_cfg)
    emb, mask = text(2, cfg)
    stages = [Stage(net, cfg, sampling=dataclasses.replace(cfg.sampling, steps=2)),
              Stage(sr_net, sr_cfg, sampling=dataclasses.replace(sr_cfg.sampling, steps=2), aug_level=0.1)]
    seen = []
    outs = sample_cascade(stages, emb, mask, seed=3, on_stage=lambda i, x: seen.append(i))
    assert [tuple(o.shape) for o in outs] == [(2, 3, 32, 32), (2, 3, 128, 128)]
    assert all(o.min() >= -1 and o.max() <= 1 for o in outs) and seen == [0, 1]
    # the base stage is the plain base sample with the same seed
    alone = build_diffusion(cfg).sample(net, emb, mask, shape=(2, 3, 32, 32), sampling=stages[0].sampling,
                                        generator=torch.Generator().manual_seed(3))
    assert torch.equal(outs[0], alone)


def test_cascade_refuses_mismatched_stages(base, sr64):
    (net, cfg), (sr_net, sr_cfg) = base, sr64
    emb, mask = text(1, cfg)
    with pytest.raises(ConfigError, match="16-px images but tiny_res_32 produces 32 px"):
        sample_cascade([Stage(net, cfg), Stage(sr_net, sr_cfg)], emb, mask)
    with pytest.raises(ConfigError, match="must be a base model"):
        sample_cascade([Stage(sr_net, sr_cfg)], emb, mask)


# --------------------------------------------------------------------------- the CLI


def test_sample_command_writes_pngs_and_grid(base, tmp_path):
    pytest.importorskip("imagen_ds.training.checkpoint")
    from safetensors.torch import save_file

    from imagen_ds.cli import main

    net, cfg = base
    # an exported inference file: weights + config as metadata (what `imagen-ds export` writes)
    ckpt = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(ckpt),
              metadata={"config": json.dumps(cfg.to_dict()), "ema": "true", "format": "imagen_ds"})
    out = tmp_path / "out"
    args = ["sample", "--prompt", "a red circle", "--prompt", "a blue square on a green background",
            "--base", str(ckpt), "--out", str(out), "--steps", "2", "--guidance", "3", "--seed", "1"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["0000_a_red_circle.png", "0001_a_blue_square_on_a_green_background.png", "grid.png"]
    assert Image.open(out / "0000_a_red_circle.png").size == (32, 32)
    first = (out / "0000_a_red_circle.png").read_bytes()
    assert CliRunner().invoke(main, args).exit_code == 0
    assert (out / "0000_a_red_circle.png").read_bytes() == first  # same seed, same image
    bad = CliRunner().invoke(main, args[:-4] + ["--steps", "2,3"])
    assert bad.exit_code == 2 and "--steps" in bad.output and "Traceback" not in bad.output
