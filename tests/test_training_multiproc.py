"""Training in several processes: the DeepSpeed launcher with two CPU ranks (gloo, ZeRO-2),
resume across rank counts, and faults (SIGKILL during a save, SIGTERM). Real shards, real model."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from test_training_support import PY, REPO, cli, demo_shards, fast_config, metrics, subprocess_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiproc")
    return {"root": root, "shards": demo_shards(tmp_path_factory), "cfg": fast_config(root / "fast.yaml")}


def _copy_checkpoint(src_run: Path, tag: str, dst_run: Path) -> None:
    """A run directory that holds only `tag`: what a run stopped right after that save leaves."""
    (dst_run / "checkpoints").mkdir(parents=True)
    shutil.copytree(src_run / "checkpoints" / tag, dst_run / "checkpoints" / tag)
    (dst_run / "checkpoints" / "latest").write_text(tag)


@pytest.fixture(scope="module")
def two_ranks(setup):
    """8 steps on two ranks through `imagen-ds train --nproc 2` (DeepSpeed's launcher)."""
    out = setup["root"] / "two"
    r = cli("train", "--model", str(setup["cfg"]), "--data", str(setup["shards"]), "--out", str(out),
            "--steps", "8", "--nproc", "2", "--seed", "1")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


def test_two_rank_cpu_run_trains_with_finite_decreasing_loss(setup, two_ranks):
    m = metrics(two_ranks)
    assert [x["step"] for x in m] == list(range(1, 9))
    assert all(math.isfinite(x["loss"]) for x in m)
    # decreasing: on 16 fixed samples x 2 fixed noise draws, the trained weights beat the initial ones
    trained = _heldout_loss(setup["shards"], two_ranks / "checkpoints" / "step_00000008")
    assert trained < 0.95 * _heldout_loss(setup["shards"], None, cfg_run=two_ranks)
    info = json.loads((two_ranks / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["launcher"] == "torch"
    tag_dir = two_ranks / "checkpoints" / "step_00000008"
    assert {p.name for p in tag_dir.glob("rng_rank*.pt")} == {"rng_rank0000.pt", "rng_rank0001.pt"}
    assert len(list(tag_dir.glob("*zero_pp_rank_*optim_states.pt"))) == 2  # every rank saved its shard


def _heldout_loss(shards: Path, checkpoint: Path | None, cfg_run: Path | None = None) -> float:
    from imagen_ds.config import config_from_dict
    from imagen_ds.data import make_train_loader
    from imagen_ds.diffusion import build_diffusion
    from imagen_ds.models import build_model
    from imagen_ds.training import load_for_inference

    if checkpoint is None:  # the weights the run started from (its seed)
        import yaml

        cfg = config_from_dict(yaml.safe_load((cfg_run / "config.yaml").read_text()))
        seed = json.loads((cfg_run / "run_info.json").read_text())["seed"]
        torch.manual_seed(seed)
        net = build_model(cfg).eval()
    else:
        net, cfg = load_for_inference(checkpoint, ema=False)
    batch = next(iter(make_train_loader(cfg, shards, micro_batch=16, rank=0, world_size=1, seed=0)))
    diffusion = build_diffusion(cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        return sum(diffusion.training_loss(net, batch["image"], batch["text_emb"], batch["text_mask"]).mean().item()
                   for _ in range(2)) / 2


def test_two_rank_resume_is_bit_identical(setup, two_ranks):
    out = setup["root"] / "two_resumed"
    _copy_checkpoint(two_ranks, "step_00000004", out)
    r = cli("train", "--model", str(setup["cfg"]), "--data", str(setup["shards"]), "--out", str(out),
            "--steps", "8", "--nproc", "2", "--seed", "1", "--resume")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    straight, resumed = metrics(two_ranks), metrics(out)
    assert [x["step"] for x in resumed] == [5, 6, 7, 8]
    assert [x["loss"] for x in resumed] == [x["loss"] for x in straight[4:]]


def test_resume_on_a_different_number_of_ranks(setup, two_ranks):
    from imagen_ds.training import load_for_inference

    out = setup["root"] / "one_from_two"
    _copy_checkpoint(two_ranks, "step_00000008", out)
    r = subprocess.run([PY, "-m", "imagen_ds.train", "--model", str(setup["cfg"]), "--data", str(setup["shards"]),
                        "--out", str(out), "--steps", "10", "--seed", "1", "--resume", "--save-every", "100"],
                       cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "saved by 2 ranks on 1 ranks" in r.stdout + r.stderr
    m = metrics(out)
    assert [x["step"] for x in m] == [9, 10] and m[0]["samples_seen"] == 9 * 8
    assert all(math.isfinite(x["loss"]) for x in m)
    # the 2-rank weights and EMA went on from where they were
    ema = torch.load(out / "checkpoints" / "step_00000010" / "ema.pt", weights_only=False)
    assert ema["num_updates"] == 10
    before, _ = load_for_inference(two_ranks / "checkpoints" / "step_00000008", ema=False)
    after, _ = load_for_inference(out, ema=False)
    drift = max((a - b).abs().max().item() for a, b in zip(before.parameters(), after.parameters()))
    assert 0 < drift < 0.1  # two small steps from the restored weights, not from a fresh init


def test_a_one_rank_run_without_zero_resumes_on_two_ranks_with_zero2(setup):
    # one rank trains without ZeRO (nothing to partition); two ranks go back to the config's ZeRO-2
    out = setup["root"] / "one_then_two"
    r = cli("train", "--model", str(setup["cfg"]), "--data", str(setup["shards"]), "--out", str(out),
            "--steps", "4", "--seed", "1")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert json.loads((out / "ds_config.json").read_text())["zero_optimization"]["stage"] == 0
    r = cli("train", "--model", str(setup["cfg"]), "--data", str(setup["shards"]), "--out", str(out),
            "--steps", "6", "--nproc", "2", "--seed", "1", "--resume")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "saved by 1 ranks on 2 ranks" in r.stdout + r.stderr
    m = metrics(out)
    assert [x["step"] for x in m] == list(range(1, 7)) and all(math.isfinite(x["loss"]) for x in m)
    tag_dir = out / "checkpoints" / "step_00000006"
    assert len(list(tag_dir.glob("*zero_pp_rank_*optim_states.pt"))) == 2


def test_two_ranks_equal_one_rank_accumulating_both_micro_batches(setup, tmp_path):
    """Rank r of 2 with micro-batch m vs 1 rank with 2 x m accumulated: same samples, same noise."""
    cfg = fast_config(tmp_path / "eq.yaml", micro_batch=2, global_batch=4)
    probe = str(REPO / "tests" / "test_training_support.py")
    port = str(29600 + os.getpid() % 1000)
    r2 = subprocess.run([PY, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", port, probe,
                         str(cfg), str(setup["shards"]), str(tmp_path / "two.pt")],
                        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    r1 = subprocess.run([PY, probe, str(cfg), str(setup["shards"]), str(tmp_path / "one.pt")],
                        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert r1.returncode == 0, r1.stdout[-3000:] + r1.stderr[-3000:]
    two, one = torch.load(tmp_path / "two.pt"), torch.load(tmp_path / "one.pt")
    assert (two["accumulation"], one["accumulation"]) == (1, 2)
    assert one["loss"] == pytest.approx(two["loss"], rel=1e-2)  # bf16 forward: tolerance
    assert one["grad_norm"] == pytest.approx(two["grad_norm"], rel=2e-2)
    lr = 1e-3  # first step of the 2-step warm-up of 2e-3
    agree = total = 0
    for name in one["before"]:
        for b, a1, a2 in [(one["before"][name], one["after"][name], two["after"][name])]:
            torch.testing.assert_close(b, two["before"][name])  # same initial weights
            d1, d2 = a1 - b, a2 - b
            agree += ((d1 - d2).abs() < 0.1 * lr).sum().item()
            total += b.numel()
    assert agree / total > 0.97  # Adam's first step is ~lr*sign(g): only near-zero gradients may differ


def _wait_for(cond, timeout: float, proc: subprocess.Popen, poll: float = 0.001):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        value = cond()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"training exited early with {proc.returncode}")
        time.sleep(poll)
    raise AssertionError("timed out")


def test_sigkill_during_a_save_keeps_the_previous_checkpoint_and_sigterm_saves_cleanly(setup, tmp_path):
    from imagen_ds.training import load_for_inference
    from imagen_ds.training.checkpoint import latest_tag

    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    cfg = fast_config(tmp_path / "k.yaml", global_batch=2, save_every=1)
    base = [PY, "-m", "imagen_ds.train", "--model", str(cfg), "--data", str(setup["shards"]), "--out", str(out),
            "--steps", "500"]

    def saving():  # a checkpoint folder being written (no meta.json yet) after a complete one exists
        if not (ckpts / "latest").is_file():
            return None
        for d in ckpts.glob("step_*"):
            if not (d / "meta.json").exists() and d.name != (ckpts / "latest").read_text():
                return d
        return None

    killed = None
    for attempt in range(3):  # the kill must land inside a save; a save takes tens of ms
        log = open(tmp_path / f"kill{attempt}.log", "w")
        proc = subprocess.Popen(base + (["--resume"] if attempt else []), cwd=REPO, env=subprocess_env(),
                                stdout=log, stderr=subprocess.STDOUT)
        target = _wait_for(saving, 240, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if not (target / "meta.json").exists():
            killed = target
            break
    assert killed is not None, "never caught a save in progress"
    previous = latest_tag(ckpts)
    assert previous is not None and int(previous[5:]) == int(killed.name[5:]) - 1
    load_for_inference(out)  # the previous checkpoint loads

    # --resume takes the previous checkpoint; SIGTERM then saves and exits cleanly
    log_path = tmp_path / "resume.log"
    proc = subprocess.Popen(base + ["--resume", "--save-every", "1000"], cwd=REPO, env=subprocess_env(),
                            stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    resumed_step = int(previous[5:])
    _wait_for(lambda: (out / "metrics.jsonl").is_file() and any(
        m["step"] >= resumed_step + 2 for m in metrics(out)), 240, proc, poll=0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    text = log_path.read_text()
    assert f"resumed from {ckpts / previous}" in text and "stopped by SIGTERM" in text
    stopped_at = max(m["step"] for m in metrics(out))
    assert latest_tag(ckpts) == f"step_{stopped_at:08d}" and stopped_at > resumed_step
    steps = [m["step"] for m in metrics(out)]
    assert steps == sorted(set(steps))  # no duplicated lines from the killed attempt
