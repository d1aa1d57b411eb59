"""The networks: shapes, text conditioning, classifier-free guidance null path, padding mask,
Efficient U-Net wiring, gradient flow, activation checkpointing, parameter counts."""
import math

import pytest
import torch

from imagen_ds.config import load_config
from imagen_ds.models import build_model, count_params

SMALL = ["tiny_res_32", "tiny_sr_64", "tiny_effsr_128", "demo_res_32"]
# the table of DESIGN.md, in parameters
REFERENCE = {"500m_res_64": 524e6, "2b_res_64": 2100e6, "600m_res_256": 646e6,
             "400m_res_256": 429e6, "600m_res_1024": 427e6}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # the suite shares 2 cores: a second intra-op thread only adds contention for these tiny nets
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def trained_like(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill the zero-initialised layers (block outputs) with small random values, as after
    some training: at init those make every block an identity and the output exactly zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return net


def make_net(name: str, seed: int = 0, **model_changes):
    cfg = load_config(name)
    if model_changes:
        cfg = cfg.replace(model=model_changes)
    torch.manual_seed(seed)
    return trained_like(build_model(cfg), seed).eval(), cfg


def inputs(cfg, batch=2, seed=1, full_size=False):
    """Training-shaped inputs; sample 0 has 5 valid text tokens, the others all."""
    g = torch.Generator().manual_seed(seed)
    m = cfg.model
    side = m.resolution if full_size else (cfg.data.train_crop or m.resolution)
    kw = {
        "x": torch.randn(batch, 3, side, side, generator=g),
        "noise_cond": torch.randn(batch, generator=g),
        "text_emb": torch.randn(batch, cfg.text.max_tokens, cfg.text.dim, generator=g),
        "text_mask": torch.ones(batch, cfg.text.max_tokens, dtype=torch.bool),
    }
    kw["text_mask"][0, 5:] = False
    if m.is_sr:
        low = side * m.lowres_resolution // m.resolution
        kw["lowres"] = torch.randn(batch, 3, low, low, generator=g)
        kw["aug_level"] = torch.rand(batch, generator=g)
    return kw


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_reference_parameter_counts_match_the_table(name):
    cfg = load_config(name)
    with torch.device("meta"):
        net = build_model(cfg)
    params = count_params(net)
    assert abs(params / REFERENCE[name] - 1) < 0.05, f"{name}: {params / 1e6:.1f}M vs {REFERENCE[name] / 1e6:.0f}M"
    assert net.config is cfg


@pytest.mark.parametrize("name", SMALL)
def test_small_configs_are_small_and_keep_the_input_shape(name):
    net, cfg = make_net(name)
    assert count_params(net) < 5e6
    for full_size in (False, True):  # training crop and full resolution (differ for tiny_effsr_128)
        kw = inputs(cfg, full_size=full_size)
        with torch.no_grad():
            out = net(**kw)
        assert out.shape == kw["x"].shape and out.dtype == kw["x"].dtype
        assert torch.isfinite(out).all()


def test_output_starts_at_zero_for_a_fresh_network():
    # zero-initialised last convs: an untrained denoiser predicts exactly 0 (EDM's F = 0 start)
    cfg = load_config("tiny_res_32")
    net = build_model(cfg)
    with torch.no_grad():
        assert net(**inputs(cfg)).abs().max() == 0


@pytest.mark.parametrize("name", SMALL)
def test_text_changes_the_output(name):
    net, cfg = make_net(name)
    kw = inputs(cfg)
    other = dict(kw, text_emb=torch.randn_like(kw["text_emb"]))
    with torch.no_grad():
        a, b = net(**kw), net(**other)
    assert (a - b).abs().amax(dim=(1, 2, 3)).min() > 1e-4  # every sample reacts


@pytest.mark.parametrize("name", ["tiny_res_32", "tiny_sr_64", "tiny_effsr_128"])
def test_padded_tokens_do_not_matter(name):
    net, cfg = make_net(name)
    kw = inputs(cfg)
    noisy = kw["text_emb"].clone()
    noisy[~kw["text_mask"]] = 100.0 * torch.randn(int((~kw["text_mask"]).sum()), cfg.text.dim)
    with torch.no_grad():
        a, b = net(**kw), net(**dict(kw, text_emb=noisy))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny_res_32", "tiny_sr_64", "tiny_effsr_128"])
def test_dropped_text_uses_the_null_embedding(name):
    net, cfg = make_net(name)
    kw = inputs(cfg)
    drop = torch.tensor([False, True])
    # a dropped sample ignores its caption and its mask ...
    other = dict(kw, text_emb=torch.randn_like(kw["text_emb"]), text_mask=torch.ones_like(kw["text_mask"]))
    with torch.no_grad():
        a = net(**kw, cond_drop=drop)
        b = net(**other, cond_drop=drop)
        conditioned = net(**kw)
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=1e-5)
    # ... the kept sample is the same as without cond_drop, the dropped one is not
    torch.testing.assert_close(a[0], conditioned[0], rtol=0, atol=1e-5)
    assert (a[1] - conditioned[1]).abs().max() > 1e-4


def test_null_embedding_is_learned_or_zero_per_config():
    learned, cfg = make_net("tiny_res_32", null_text="learned")
    zero, _ = make_net("tiny_res_32", null_text="zero")
    names = lambda n: {k for k, _ in n.named_parameters()}  # noqa: E731
    assert {"cond.null_token", "cond.null_pooled"} <= names(learned)
    assert not any("null" in k for k in names(zero))
    kw = inputs(cfg)
    drop = torch.tensor([True, False])
    with torch.no_grad():
        before = learned(**kw, cond_drop=drop)
        learned.cond.null_token.add_(torch.randn(cfg.model.cond_dim, generator=torch.Generator().manual_seed(3)))
        after = learned(**kw, cond_drop=drop)
    assert (before[0] - after[0]).abs().max() > 1e-4           # the dropped row reads the null token
    torch.testing.assert_close(before[1], after[1], rtol=0, atol=0)  # the kept row does not


@pytest.mark.parametrize("name", ["tiny_res_32", "tiny_sr_64", "tiny_effsr_128"])
def test_gradients_reach_every_parameter(name):
    net, cfg = make_net(name, null_text="learned")
    net.train()
    kw = inputs(cfg, batch=3)
    net(**kw, cond_drop=torch.tensor([False, True, False])).square().mean().backward()
    dead = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.any()]
    assert dead == []


@pytest.mark.parametrize("name", ["tiny_res_32", "tiny_effsr_128"])
def test_activation_checkpointing_gives_the_same_gradients(name):
    plain, cfg = make_net(name, checkpoint_activations=False)
    ckpt, _ = make_net(name, checkpoint_activations=True)
    ckpt.load_state_dict(plain.state_dict())
    kw = inputs(cfg)
    grads = []
    for net in (plain, ckpt):
        net.train()
        net(**kw).square().mean().backward()
        grads.append({n: p.grad for n, p in net.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7, msg=n)


def test_channels_last_gives_the_same_output():
    net, cfg = make_net("tiny_sr_64")
    kw = inputs(cfg)
    with torch.no_grad():
        ref = net(**kw)
        net = net.to(memory_format=torch.channels_last)
        cl = dict(kw, x=kw["x"].to(memory_format=torch.channels_last),
                  lowres=kw["lowres"].to(memory_format=torch.channels_last))
        out = net(**cl)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_efficient_unet_resamples_and_adds_skips_as_configured():
    net, cfg = make_net("tiny_effsr_128")
    m = cfg.model
    levels = m.num_levels
    calls = []  # (what, level, input, output) in call order

    def record(what, level):
        return lambda mod, args, out: calls.append((what, level, args[0].detach(), out.detach()))

    for lv in range(levels):
        net.down_samples[lv].register_forward_hook(record("down-sample", lv))
        net.down_blocks[lv][0].register_forward_hook(record("down-block", lv))
        net.down_blocks[lv][-1].register_forward_hook(record("down-out", lv))
        net.up_blocks[lv][0].register_forward_hook(record("up-block", lv))
        net.up_samples[lv].register_forward_hook(record("up-sample", lv))
    kw = inputs(cfg, batch=1, full_size=True)
    with torch.no_grad():
        net(**kw)
    order = [(w, lv) for w, lv, _, _ in calls if w != "down-out"]
    down = [(w, lv) for lv in range(levels) for w in ("down-sample", "down-block")]
    up = [(w, lv) for lv in reversed(range(levels)) for w in ("up-block", "up-sample")]
    assert order == down + up  # down-sample FIRST in each level; up-sample LAST
    by = {(w, lv): (i, o) for w, lv, i, o in calls}
    # each level but the deepest halves the side before its blocks; the deepest keeps it
    sides = [by[("down-block", lv)][0].shape[-1] for lv in range(levels)]
    assert sides == [64, 32, 16, 16]
    assert by[("up-sample", 0)][1].shape[-1] == m.resolution
    # skips are ADDED (same width, not concatenated): up input = up-sampled deeper output + skip
    for lv in range(levels - 1):
        up_in = by[("up-block", lv)][0]
        expected = by[("up-sample", lv + 1)][1] + by[("down-out", lv)][1]
        torch.testing.assert_close(up_in, expected, rtol=0, atol=1e-6)
        assert up_in.shape[1] == m.base_channels * m.channel_mults[lv]


@pytest.mark.parametrize("name, scale", [("tiny_effsr_128", 1 / math.sqrt(2)), ("tiny_res_32", 1.0)])
def test_residual_shortcut_scaling(name, scale):
    # A fresh block's zero-initialised last conv makes its residual branch 0: what is left is
    # the shortcut, scaled by 1/sqrt(2) in the Efficient U-Net and not in the U-Net.
    cfg = load_config(name)
    torch.manual_seed(0)
    net = build_model(cfg).eval()
    blocks = [mod for mod in net.modules() if type(mod).__name__ == "ResBlock" and mod.resample is None]
    seen = []
    for block in blocks:
        block.register_forward_hook(lambda mod, args, out: seen.append((mod, args[0], out)))
    with torch.no_grad():
        net(**inputs(cfg, batch=1))
    assert len(seen) == len(blocks)
    for block, x, out in seen:
        torch.testing.assert_close(out, scale * block.shortcut(x), rtol=1e-5, atol=1e-6)


def test_no_attention_mask_is_passed_when_every_token_is_valid(monkeypatch):
    # any mask disables the flash kernel on GPU
    import torch.nn.functional as F
    masks = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        masks.append(attn_mask)
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    net, cfg = make_net("tiny_res_32")
    kw = inputs(cfg)
    with torch.no_grad():
        net(**dict(kw, text_mask=torch.ones_like(kw["text_mask"])))
        assert masks and all(mk is None for mk in masks)
        masks.clear()
        net(**kw)
        assert masks and all(mk is not None for mk in masks)


@pytest.mark.parametrize("changes", [
    {"resblock_updown": True},                 # BigGAN resampling inside residual blocks (400m_res_256)
    {"attention_type": "self_cross"},
    {"attention_type": "cross"},
    {"attention_type": "self", "num_heads": 2, "head_dim": None},
])
def test_unet_variants_keep_shape_and_ignore_padding(changes):
    net, cfg = make_net("tiny_sr_64", **changes)
    kw = inputs(cfg)
    noisy = kw["text_emb"].clone()
    noisy[~kw["text_mask"]] = 50.0
    with torch.no_grad():
        a, b = net(**kw), net(**dict(kw, text_emb=noisy))
    assert a.shape == kw["x"].shape
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
