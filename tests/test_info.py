"""`imagen-ds info`: the JSON a user scripts against, FLOPs against hand counts, ZeRO memory."""
import json

import pytest
import torch
from click.testing import CliRunner

from imagen_ds.bench.flops import train_flops_per_sample
from imagen_ds.bench.memory import model_state_bytes
from imagen_ds.cli import main
from imagen_ds.config import load_config


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_info_json_for_the_2b_model():
    result = CliRunner().invoke(main, ["info", "--model", "2b_res_64", "--json", "--gpus", "8"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert {"name", "params", "resolution", "unet", "text_dim", "train_flops_per_sample"} <= set(info)
    assert info["name"] == "2b_res_64" and info["unet"] == "UNet" and info["resolution"] == 64
    assert info["text_dim"] == 1024
    assert abs(info["params"] / 2100e6 - 1) < 0.05
    # a 2B U-Net at 64 px: a few TFLOP per training sample (6 x params x ~300 "tokens")
    assert 1e12 < info["train_flops_per_sample"] < 1e13
    # ZeRO-2 on 8 GPUs: bf16 weights + fp32 EMA whole, the rest sharded
    p = info["params"]
    assert info["model_state_bytes_per_gpu"]["total"] == pytest.approx(6 * p + 14 * p / 8, rel=1e-6)


def test_info_text_and_list():
    runner = CliRunner()
    text = runner.invoke(main, ["info", "--model", "600m_res_1024"])
    assert text.exit_code == 0 and "EfficientUNet" in text.output and "256 px crops" in text.output
    listed = runner.invoke(main, ["info", "--list", "--json"])
    names = {m["name"] for m in json.loads(listed.output)}
    assert {"500m_res_64", "2b_res_64", "600m_res_256", "400m_res_256", "600m_res_1024", "tiny_res_32"} <= names


def attention_flops(n_img, n_txt, channels, cond_dim):
    """Hand count of one fused attention layer's forward (2 FLOPs per multiply-add)."""
    s = n_img + n_txt  # keys: image tokens + text tokens
    return (2 * n_img * channels * channels          # q
            + 2 * n_img * channels * 2 * channels    # image k, v
            + 2 * n_txt * cond_dim * 2 * channels    # text k, v
            + 2 * n_img * s * channels * 2           # q k^T and attention x v
            + 2 * n_img * channels * channels)       # out projection


def test_flops_of_one_attention_layer_match_a_hand_count():
    # tiny_res_32 with and without the middle block's attention: 8x8 image tokens, 64 channels,
    # 64 text tokens of cond_dim 64. Backward costs twice the forward (grads of inputs + weights).
    cfg = load_config("tiny_res_32")
    with_mid = train_flops_per_sample(cfg)
    without = train_flops_per_sample(cfg.replace(model={"mid_attention": False}))
    assert with_mid - without == 3 * attention_flops(8 * 8, 64, 64, 64)


def test_flops_of_one_conv_match_a_hand_count():
    # One more level-0 residual block in tiny_res_32 adds on the down path a block 32 -> 32 ch
    # (two 3x3 convs at 32x32) and on the up path one block (32 + 32) -> 32 ch with a 1x1
    # shortcut, plus each block's scale-shift Linear(128 -> 64).
    cfg = load_config("tiny_res_32")
    base = train_flops_per_sample(cfg)
    more = train_flops_per_sample(cfg.replace(model={"num_res_blocks": (2, 1, 1)}))

    def conv(cin, cout, k, side):
        return 2 * cin * cout * k * k * side * side

    fwd = (2 * conv(32, 32, 3, 32)                                         # new down block
           + conv(64, 32, 3, 32) + conv(32, 32, 3, 32) + conv(64, 32, 1, 32)  # new up block
           + 2 * 2 * 128 * 64)                                              # two emb projections
    assert more - base == 3 * fwd


def test_model_state_memory_by_zero_stage():
    p, gb = 10**9, 10**9
    # per parameter: bf16 weights 2 + grads 2, fp32 master 4, Adam m+v 8, fp32 EMA 4
    assert model_state_bytes(p, 0, 8)["total"] == 20 * gb
    assert model_state_bytes(p, 1, 8)["total"] == 8 * gb + 12 * gb // 8
    assert model_state_bytes(p, 2, 8)["total"] == 6 * gb + 14 * gb // 8
    assert model_state_bytes(p, 3, 8)["total"] == 4 * gb + 16 * gb // 8
    assert model_state_bytes(p, 2, 1)["total"] == 20 * gb  # one GPU: nothing to shard
    assert model_state_bytes(p, 2, 8, ema=False)["total"] == 2 * gb + 14 * gb // 8
