"""`imagen-ds demo` end to end, shortened: data -> DeepSpeed training -> samples -> checker -> report.

Only the pipeline is checked here (a few steps learn nothing); the accuracy goal is measured by
`make demo` itself and recorded in docs/demo.md.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from imagen_ds.data.synthetic import heldout_combos
from imagen_ds.eval.alignment import parse_caption


@pytest.mark.slow
def test_demo_pipeline_writes_summary_grid_and_a_usable_checkpoint(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "imagen_ds.cli", "demo", "--out", str(out), "--steps", "3", "--minutes", "0",
           "--images", "96", "--per-caption", "2", "--sample-steps", "2", "--no-docs"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]

    summary = json.loads((out / "summary.json").read_text())
    for key in ("color_accuracy", "shape_accuracy", "uncond_color_accuracy", "train_minutes", "steps"):
        assert key in summary, key
    assert summary["steps"] == 3
    assert 0.0 <= summary["color_accuracy"] <= 1.0 and 0.0 <= summary["uncond_color_accuracy"] <= 1.0
    # the held-out captions are the generator's held-out combinations, never trained on
    held = heldout_combos()
    assert [parse_caption(c) for c in summary["heldout_captions"]] == held
    assert summary["samples_per_caption"] == 2

    # the printed summary names the accuracy a newcomer is looking for
    assert "colour accuracy" in proc.stdout and "text dropped" in proc.stdout

    # grid: one row per held-out caption + the text-dropped row, images shown 4x (32 px -> 128 px)
    grid = Image.open(out / "grid.png")
    assert grid.width >= 2 * 128 and grid.height >= (len(held) + 1) * 128

    # the run directory is an ordinary checkpoint that sampling tools load
    from imagen_ds.training.checkpoint import load_for_inference

    net, cfg = load_for_inference(out / "run")
    assert cfg.name == "demo_res_32" and not net.training


def test_demo_data_is_reused_only_when_it_matches_and_stale_shards_go(tmp_path, capsys):
    from imagen_ds.config import load_config
    from imagen_ds.demo import make_data

    cfg = load_config("demo_res_32")
    out = tmp_path / "data"
    make_data(cfg, out, 30, seed=0)
    assert "drawing 30" in capsys.readouterr().out
    make_data(cfg, out, 30, seed=0)
    assert "reusing 30" in capsys.readouterr().out
    # embeddings from another version of the encoder (same name): redrawn, not trusted
    info = json.loads((out / "heldout.json").read_text())
    (out / "heldout.json").write_text(json.dumps({**info, "encoder_fingerprint": "other"}))
    (out / "000007.tar").write_bytes(b"a shard from an earlier, bigger run")
    make_data(cfg, out, 30, seed=0)
    assert "drawing 30" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("*.tar")) == ["000000.tar"]


def test_the_step_budget_follows_the_measured_pace_and_the_lr_decays_within_it():
    import torch

    from types import SimpleNamespace

    from imagen_ds.config import load_config
    from imagen_ds.demo import StepBudget, follow_budget

    fixed = StepBudget(steps=300, minutes=None, start=0.0)
    assert fixed.total() == 300 and not fixed.done(299, 1e9) and fixed.done(300, 0.0)
    timed = StepBudget(steps=None, minutes=10, start=100.0)
    timed.observe(5, 105.0)              # too early to trust
    assert timed.total() == 100_000
    timed.observe(50, 125.0)             # 0.5 s per step -> 600 s allow 1200 steps
    assert timed.total() == 1200 and not timed.done(50, 125.0) and timed.done(51, 700.0)
    both = StepBudget(steps=800, minutes=10, start=0.0)
    both.observe(50, 25.0)
    assert both.total() == 800           # whichever ends first
    # a cosine schedule spanning the budget ends near zero when the time does
    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([w], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    tr = load_config("demo_res_32").replace(training={"lr_schedule": "cosine", "warmup_steps": 10}).training
    follow_budget(SimpleNamespace(lr_scheduler=sched), tr, timed)  # what the demo does to its engine
    for _ in range(1199):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] < 1e-4


def test_noise_level_script_shows_where_the_demo_learns_the_colour_from_the_text():
    """scripts/demo_noise_levels.py (the table in docs/demo.md): colour readable from the noisy
    image at low noise, not at high; the demo trains far more often above sigma 3 than EDM's default."""
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(repo / "scripts" / "demo_noise_levels.py"), "demo_res_32", "500m_res_64"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {float(line.split()[0]): [float(x) for x in line.split()[1:]]
            for line in proc.stdout.splitlines()[1:]}
    readable = [r[0] for _, r in sorted(rows.items())]
    assert readable[0] >= 0.98 and readable[-1] < 0.6 and readable == sorted(readable, reverse=True)
    demo_above_3, default_above_3 = rows[3.0][1], rows[3.0][2]
    assert demo_above_3 == pytest.approx(0.309, abs=1e-3) and default_above_3 == pytest.approx(0.028, abs=1e-3)
