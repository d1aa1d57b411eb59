"""`imagen-ds demo` end to end, shortened: data -> DeepSpeed training -> samples -> checker -> report.

Only the pipeline is checked here (a few steps learn nothing); the accuracy goal is measured by
`make demo` itself and recorded in docs/demo.md.
"""
import json
import subprocess
import sys

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
