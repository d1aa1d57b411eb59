"""Training engine, in one process: real DeepSpeed (ZeRO-2, CPU), real shards, the real tiny UNet."""
from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from click.testing import CliRunner

from imagen_ds.config import config_from_dict, load_config
from imagen_ds.errors import ConfigError
from test_training_support import demo_shards, fast_config, metrics


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # one process on two shared cores: more threads only spin
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return demo_shards(tmp_path_factory)


# --------------------------------------------------------------------------- configuration


def test_batch_fields_multiply_to_the_global_batch_or_one_clear_error():
    from imagen_ds.training.ds_config import build_ds_config, grad_accumulation

    cfg = load_config("tiny_res_32").replace(training={"micro_batch": 2, "global_batch": 16})
    ds, resolved = build_ds_config(cfg, world_size=2)
    assert ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 2 == ds["train_batch_size"] == 16
    assert resolved.training.precision == "fp32" and ds["bf16"]["enabled"] is False
    with pytest.raises(ConfigError, match=r"training\.global_batch.*micro_batch 2 x world size 3"):
        grad_accumulation(16, 2, world_size=3)
    # a user JSON that disagrees with the model YAML is named, field by field
    with pytest.raises(ConfigError, match="train_batch_size"):
        build_ds_config(cfg, 2, {"train_batch_size": 32, "zero_optimization": {"stage": 2}})
    # an explicit bf16 JSON wins, and the resolved config says so; grads then accumulate in fp32
    ds, resolved = build_ds_config(cfg, 2, "zero2_bf16")
    assert resolved.training.precision == "bf16" and ds["data_types"]["grad_accum_dtype"] == "fp32"
    assert ds["zero_optimization"]["stage"] == 2 and ds["gradient_clipping"] == 1.0


def test_one_fp32_rank_runs_without_zero_and_the_guard_clips_and_skips():
    from imagen_ds.training.ds_config import build_ds_config
    from imagen_ds.training.optim import NonFiniteGuard

    cfg = load_config("tiny_res_32")  # fp32, ZeRO-2 in its YAML
    assert build_ds_config(cfg, world_size=1)[1].training.zero_stage == 0   # nothing to partition
    assert build_ds_config(cfg, world_size=2)[1].training.zero_stage == 2
    bf16 = cfg.replace(training={"precision": "bf16"})
    assert build_ds_config(bf16, world_size=1)[1].training.zero_stage == 2  # ZeRO gives bf16 its fp32 masters
    assert build_ds_config(cfg, 1, "zero2_fp32")[1].training.zero_stage == 2  # a named JSON is obeyed

    w = torch.nn.Parameter(torch.zeros(4))
    opt = NonFiniteGuard(torch.optim.SGD([w], lr=1.0), max_norm=1.0)
    w.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])  # norm 5 -> clipped to 1
    opt.step()
    assert not opt.overflow and torch.allclose(w.detach(), torch.tensor([-0.6, -0.8, 0.0, 0.0]))
    w.grad = torch.tensor([float("nan"), 1.0, 0.0, 0.0])
    opt.step()
    assert opt.overflow and w.grad is None and torch.allclose(w.detach(), torch.tensor([-0.6, -0.8, 0.0, 0.0]))


def test_cli_train_reports_a_bad_batch_in_one_line(tmp_path):
    from imagen_ds.cli import main

    r = CliRunner().invoke(main, ["train", "--model", "tiny_res_32", "--data", str(tmp_path), "--out",
                                  str(tmp_path / "run"), "--micro-batch", "4", "--global-batch", "6"])
    assert r.exit_code == 2
    assert len(r.output.strip().splitlines()) == 1 and "training.global_batch" in r.output


def test_learning_rate_warms_up_linearly_then_holds_or_follows_a_cosine():
    from imagen_ds.training.optim import lr_factor

    assert [lr_factor(s, 4, "constant", 100) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_factor(4, 4, "cosine", 104) == 1.0
    assert lr_factor(54, 4, "cosine", 104) == pytest.approx(0.5)
    assert lr_factor(104, 4, "cosine", 104) == pytest.approx(0.0)


def test_ema_warmup_decay_follows_its_formula():
    from imagen_ds.training.ema import ema_decay

    assert ema_decay(0.9999, 0, warmup=True) == pytest.approx(0.1)
    assert ema_decay(0.9999, 90, warmup=True) == pytest.approx(91 / 100)
    assert ema_decay(0.9999, 10**6, warmup=True) == 0.9999
    assert ema_decay(0.9999, 0, warmup=False) == 0.9999


# --------------------------------------------------------------------------- engine-level behaviour


def _engine(cfg, ds_config=None):
    from imagen_ds.training.dist_env import init_distributed, setup_env
    from imagen_ds.training.engine import build_engine

    init_distributed(setup_env())
    return build_engine(cfg, ds_config=ds_config, steps=10, seed=0)


def _batches(n, seed=0, b=2):
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.rand(b, 3, 32, 32, generator=g) * 2 - 1, "text_emb": torch.randn(b, 64, 64, generator=g),
             "text_mask": torch.ones(b, 64, dtype=torch.bool)} for _ in range(n)]


def test_ema_moves_once_per_optimizer_step_with_the_updated_weights():
    from imagen_ds.diffusion import build_diffusion
    from imagen_ds.training.ema import EMA
    from imagen_ds.training.engine import train_step

    cfg = load_config("tiny_res_32").replace(training={"micro_batch": 2, "global_batch": 4, "lr": 1e-2,
                                                       "warmup_steps": 0})
    built = _engine(cfg)
    assert built.accumulation == 2
    module, diffusion = built.engine.module, build_diffusion(cfg)
    ema = EMA(module, decay=0.5)
    expected = {n: p.detach().float().clone() for n, p in module.named_parameters()}
    it = iter(_batches(6))
    for _ in range(3):  # 3 optimizer steps = 6 micro-batches
        res = train_step(built, diffusion, it)
        assert res.applied
        ema.update(module)
        for n, p in module.named_parameters():
            expected[n] = 0.5 * expected[n] + 0.5 * p.detach().float()
    assert ema.num_updates == 3
    moved = 0
    for n, p in module.named_parameters():
        torch.testing.assert_close(ema.shadow[n], expected[n], rtol=0, atol=1e-6)
        moved += int(not torch.equal(ema.shadow[n], p.detach().float()))
    assert moved > 0  # the average lags the weights


@pytest.mark.parametrize("ds_config", ["zero2_bf16", None])
def test_bf16_gradients_accumulate_in_fp32(ds_config):
    """The gradient DeepSpeed holds after 4 bf16 micro-batches is the fp32 sum of their bf16
    gradients; summing them in bf16 instead would be off by ~1e-3. With ZeRO-2 named explicitly
    and with the default on one rank (which keeps ZeRO for bf16: see single_rank_stage)."""
    import copy

    from deepspeed.utils import safe_get_full_grad

    from imagen_ds.diffusion import build_diffusion
    from imagen_ds.training.engine import autocast_for

    cfg = load_config("tiny_res_32").replace(training={"micro_batch": 2, "global_batch": 8, "precision": "bf16"})
    built = _engine(cfg, ds_config)
    assert built.cfg.training.zero_stage == 2
    engine, diffusion = built.engine, build_diffusion(cfg)
    assert built.accumulation == 4 and next(engine.module.parameters()).dtype == torch.bfloat16
    ref = copy.deepcopy(engine.module)  # the same bf16 network, plain autograd
    fp32_sum = {n: torch.zeros(p.shape) for n, p in ref.named_parameters()}
    bf16_sum = {n: torch.zeros(p.shape, dtype=torch.bfloat16) for n, p in ref.named_parameters()}
    for i, b in enumerate(_batches(4, seed=1)):
        for net in (engine, ref):
            torch.manual_seed(10 + i)  # same noise for both
            with autocast_for(built.cfg, engine.device):
                loss = diffusion.training_loss(net, b["image"], b["text_emb"], b["text_mask"]).float().mean()
            if net is engine:
                engine.backward(loss)  # DeepSpeed divides by the 4 accumulation steps
            else:
                ref.zero_grad()
                (loss / 4).backward()
        for n, p in ref.named_parameters():
            fp32_sum[n] += p.grad.float()
            bf16_sum[n] += p.grad
        if i < 3:
            engine.step()
    err_ds = err_bf16 = total = 0.0
    for n, p in engine.module.named_parameters():
        g = safe_get_full_grad(p)
        assert g.dtype == torch.float32
        err_ds += (g - fp32_sum[n]).abs().sum().item()
        err_bf16 += (bf16_sum[n].float() - fp32_sum[n]).abs().sum().item()
        total += fp32_sum[n].abs().sum().item()
    assert err_ds / total < 1e-6 < 1e-4 < err_bf16 / total


# --------------------------------------------------------------------------- whole runs, in process


@pytest.fixture(scope="module")
def runs(shards, tmp_path_factory):
    """bf16 tiny runs: 8 steps straight; 4 steps (with W&B + sample grids), then --resume to 8."""
    from imagen_ds.training import run

    root = tmp_path_factory.mktemp("train_runs")
    cfg = load_config(fast_config(root / "fast.yaml", global_batch=4, sample_every=4))
    common = dict(ds_config="zero2_bf16", seed=3, save_every=4)
    straight = run(cfg, shards, root / "straight", steps=8, **common)
    first = run(cfg, shards, root / "resumed", steps=4, use_wandb=True, **common)
    second = run(cfg, shards, root / "resumed", steps=8, resume=True, use_wandb=True, **common)
    return {"root": root, "cfg": cfg, "straight": straight, "first": first, "second": second}


def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(runs):
    a, b = metrics(runs["root"] / "straight"), metrics(runs["root"] / "resumed")
    assert [m["step"] for m in a] == [m["step"] for m in b] == list(range(1, 9))
    assert [m["loss"] for m in a[4:]] == [m["loss"] for m in b[4:]]
    assert all(math.isfinite(m["loss"]) for m in a)
    assert runs["second"]["step"] == 8 and runs["second"]["samples_seen"] == 8 * 4
    info = json.loads((runs["root"] / "resumed" / "run_info.json").read_text())
    assert info["resumed_from"].endswith("step_00000004") and len(info["starts"]) == 2


def test_run_directory_records_config_commit_seeds_versions_and_metrics(runs):
    out = runs["root"] / "resumed"
    resolved = config_from_dict(yaml.safe_load((out / "config.yaml").read_text()))
    assert resolved.training.precision == "bf16" and resolved.model == runs["cfg"].model
    info = json.loads((out / "run_info.json").read_text())
    assert len(info["git"]["commit"]) == 40 and info["seed"] == 3 and info["world_size"] == 1
    assert info["versions"]["torch"] and info["versions"]["deepspeed"] and info["optimizer"].startswith("torch.optim.AdamW")
    ds = json.loads((out / "ds_config.json").read_text())
    assert ds["train_batch_size"] == 4 and ds["zero_optimization"]["stage"] == 2
    for m in metrics(out):
        assert {"step", "loss", "lr", "samples_seen", "grad_norm", "samples_per_s", "step_time", "data_wait",
                "peak_mem_gb"} <= set(m) and m["samples_seen"] == 4 * m["step"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir()) == ["step_00000004", "step_00000008"]
    assert (out / "checkpoints" / "latest").read_text() == "step_00000008"
    assert (out / "samples" / "step_00000004.png").is_file() and (out / "samples" / "step_00000008.png").is_file()


def test_wandb_logs_offline_and_the_resumed_run_keeps_its_id(runs):
    out = runs["root"] / "resumed"
    run_id = (out / "wandb_run_id").read_text().strip()
    dirs = sorted(p.name for p in (out / "wandb").glob("offline-run-*"))
    assert len(dirs) == 2 and all(d.endswith(run_id) for d in dirs)


def test_ema_is_saved_and_differs_from_the_raw_weights(runs):
    from imagen_ds.training import load_for_inference

    out = runs["root"] / "resumed"
    ema = torch.load(out / "checkpoints" / "step_00000008" / "ema.pt", weights_only=False)
    assert ema["num_updates"] == 8
    ema_net, _ = load_for_inference(out, ema=True)
    raw_net, _ = load_for_inference(out, ema=False)
    init_net, _ = load_for_inference(out / "checkpoints" / "step_00000004", ema=True)
    diffs = [not torch.equal(a, b) for a, b in zip(ema_net.parameters(), raw_net.parameters())]
    assert any(diffs)
    assert any(not torch.equal(a, b) for a, b in zip(ema_net.parameters(), init_net.parameters()))


def test_exported_safetensors_loads_into_a_fresh_model_and_samples(runs, tmp_path):
    from imagen_ds.cli import main
    from imagen_ds.diffusion import build_diffusion
    from imagen_ds.training import load_for_inference

    out = runs["root"] / "resumed"
    f = tmp_path / "tiny.safetensors"
    r = CliRunner().invoke(main, ["export", "--checkpoint", str(out), "--out", str(f)])
    assert r.exit_code == 0, r.output
    net, cfg = load_for_inference(f)
    ref, _ = load_for_inference(out)
    assert cfg.model == runs["cfg"].model and not net.training
    for (n, a), (_, b) in zip(net.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), n
    emb = torch.randn(2, 8, 64)
    images = build_diffusion(cfg).sample(net, emb, torch.ones(2, 8, dtype=torch.bool), shape=(2, 3, 32, 32),
                                         generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all() and images.abs().max() <= 1


def test_non_finite_losses_are_skipped_and_too_many_in_a_row_stop_the_run(shards, tmp_path):
    from imagen_ds.data import make_train_loader
    from imagen_ds.training import TrainingStopped, load_for_inference, run

    cfg = load_config(fast_config(tmp_path / "f.yaml", global_batch=2, max_bad_steps=2))

    def poisoned(bad_steps):
        def data(**kw):  # the real loader, with NaN images in the batches of `bad_steps`
            for step, batch in enumerate(make_train_loader(cfg, shards, **kw), start=kw["skip_batches"] + 1):
                if step in bad_steps:
                    batch["image"] = torch.full_like(batch["image"], float("nan"))
                yield batch
        return data

    s = run(cfg, poisoned({3}), tmp_path / "one", steps=5, save_every=100)
    m = metrics(tmp_path / "one")
    assert s["skipped_steps"] == 1 and m[-1]["skipped_steps"] == 1
    assert math.isnan(m[2]["loss"]) and all(math.isfinite(x["loss"]) for x in m if x["step"] != 3)
    assert m[3]["lr"] == m[2]["lr"] < m[1]["lr"] * 10  # the skipped update did not advance the schedule

    with pytest.raises(TrainingStopped, match=r"2 steps in a row .*checkpoints/step_00000002"):
        run(cfg, poisoned({3, 4, 5}), tmp_path / "two", steps=8, save_every=2)
    ckpts = tmp_path / "two" / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000002"
    net, _ = load_for_inference(tmp_path / "two")
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_a_corrupt_sample_is_skipped_counted_in_the_metrics_and_training_goes_on(shards, tmp_path):
    from imagen_ds.data.shards import iter_tar_samples, write_tar
    from imagen_ds.training import run

    samples = [{k: v for k, v in s.items() if k != "__url__"} for s in iter_tar_samples(str(shards / "000000.tar"))]
    samples[3]["png"] = b"\x89PNG this is not an image"
    (tmp_path / "data").mkdir()
    write_tar(tmp_path / "data" / "000000.tar", samples)
    cfg = load_config(fast_config(tmp_path / "f.yaml"))
    s = run(cfg, str(tmp_path / "data"), tmp_path / "run", steps=3, save_every=100)
    m = metrics(tmp_path / "run")
    assert s["step"] == 3 and all(math.isfinite(x["loss"]) for x in m)
    # 3 steps x 8 samples read the 12-sample shard twice: the bad one is met (and skipped) each time
    assert m[-1]["data_skipped"] == m[-1]["data_skipped/corrupt_image"] >= 1
    assert m[-1]["data_seen"] >= 24


# --------------------------------------------------------------------------- launchers


def test_rank_and_rendezvous_come_from_each_launcher():
    from imagen_ds.training.dist_env import first_slurm_host, setup_env

    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "4242",
             "SLURM_JOB_NODELIST": "gpu[003-004,010],login1"}
    env = setup_env(environ=slurm)
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (5, 16, 1, "slurm")
    assert slurm["MASTER_ADDR"] == "gpu003" and slurm["RANK"] == "5" and slurm["MASTER_PORT"] == str(20000 + 4242)
    assert first_slurm_host("node7") == "node7"
    # the deepspeed launcher: RANK/WORLD_SIZE in the environment and --local_rank on the command line
    ds = {"RANK": "3", "WORLD_SIZE": "4", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29501"}
    env = setup_env(local_rank_arg=1, environ=ds)
    assert (env.rank, env.local_rank, env.world_size, env.launcher) == (3, 1, 4, "torch") and ds["LOCAL_RANK"] == "1"
    # plain python: one process, with the variables DeepSpeed needs
    single = {}
    env = setup_env(environ=single)
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "single")
    assert {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"} <= set(single)


def test_a_one_process_job_does_not_reuse_a_port_its_parent_still_holds():
    import socket

    from imagen_ds.training.dist_env import setup_env

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        busy = str(held.getsockname()[1])
        # what a child of a process that already ran setup_env() inherits
        inherited = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": busy}
        setup_env(environ=inherited)
        assert inherited["MASTER_PORT"] != busy
        # a multi-process job must keep the port every rank agreed on
        multi = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": busy}
        setup_env(environ=multi)
        assert multi["MASTER_PORT"] == busy


def test_train_script_runs_as_a_file_and_as_a_module_with_the_launcher_flag():
    import subprocess
    import sys

    from imagen_ds.train import parser
    from imagen_ds.training.launch import launch_command
    from test_training_support import REPO

    assert parser().parse_args(["--model", "m", "--data", "d", "--out", "o", "--local_rank=2"]).local_rank == 2
    r = subprocess.run([sys.executable, str(REPO / "imagen_ds" / "train.py"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--resume" in r.stdout
    cmd = launch_command(2, ["--model", "m"], master_port=1234)
    assert cmd[1:5] == ["-m", "deepspeed.launcher.runner", "--num_gpus", "2"] and cmd[-2:] == ["--model", "m"]


def test_a_build_lock_left_by_a_killed_process_does_not_block_the_next_start(tmp_path, monkeypatch):
    import os
    import time

    from imagen_ds.training.dist_env import STALE_LOCK_S, clear_stale_extension_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    (tmp_path / "deepspeed_shm_comm").mkdir()
    (tmp_path / "other_op").mkdir()
    stale, fresh = tmp_path / "deepspeed_shm_comm" / "lock", tmp_path / "other_op" / "lock"
    stale.write_text("")
    fresh.write_text("")
    old = time.time() - STALE_LOCK_S - 60
    os.utime(stale, (old, old))
    assert clear_stale_extension_locks() == [str(stale)]
    assert not stale.exists() and fresh.exists()  # a build in progress keeps its lock
