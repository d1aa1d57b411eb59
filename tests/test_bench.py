"""benchmark-throughput and the memory planner, as a user sees them.

FLOP hand counts and the ZeRO memory formula are tested in test_info.py; here: the planner's
predicted peak against the peak the real DeepSpeed engine allocates on the CPU (profiler
allocation events), the fake-tensor measurement used for big models against a real one, the
2B plan a user asks for, and the benchmark's JSON.
"""
import json

import pytest
import torch
from click.testing import CliRunner

from imagen_ds.cli import main
from imagen_ds.config import load_config

SMALL_BUCKETS = {  # DeepSpeed's default 2e8-element buckets would dwarf a tiny model's state
    "bf16": {"enabled": True},
    "data_types": {"grad_accum_dtype": "fp32"},
    "zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True,
                          "reduce_bucket_size": 500000, "allgather_bucket_size": 500000},
    "gradient_clipping": 1.0,
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _engine_peak_bytes(cfg, ds_config, steps=2):
    """Peak CPU bytes of building the engine (+ EMA) and running `steps` training steps."""
    from imagen_ds.bench.peak_memory import peak_bytes_cpu_profiler
    from imagen_ds.bench.synthetic import repeat, synthetic_batch
    from imagen_ds.diffusion import build_diffusion
    from imagen_ds.models import build_model
    from imagen_ds.training.dist_env import init_distributed, setup_env
    from imagen_ds.training.ema import EMA
    from imagen_ds.training.engine import build_engine, train_step

    init_distributed(setup_env())

    def run():
        torch.manual_seed(0)
        built = build_engine(cfg, ds_config=ds_config, model=build_model(cfg), steps=10)
        ema = EMA(built.engine.module, cfg.training.ema_decay)
        diffusion = build_diffusion(cfg)
        batches = repeat(synthetic_batch(cfg, cfg.training.micro_batch))
        for _ in range(steps):
            train_step(built, diffusion, batches)
            ema.update(built.engine.module)

    return peak_bytes_cpu_profiler(run)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_planner_predicts_the_engines_measured_peak_within_10_percent(checkpointing):
    from imagen_ds.bench.planner import make_plan

    micro_batch = 8  # the planner measures batches 1 and 2 and extrapolates
    cfg = load_config("tiny_res_32").replace(
        training={"precision": "bf16", "micro_batch": micro_batch, "global_batch": micro_batch},
        model={"checkpoint_activations": checkpointing})
    measured = _engine_peak_bytes(cfg, SMALL_BUCKETS)
    plan = make_plan(cfg, gpus=1, gpu_mem_gb=1.0, measure_on="cpu", ds_config=SMALL_BUCKETS, for_cpu=True)
    key = "checkpointing" if checkpointing else "no_checkpointing"
    predicted = plan["options"][key]["predicted_peak_bytes_at_config_micro_batch"]
    assert predicted == pytest.approx(measured, rel=0.10), (predicted, measured)
    # and checkpointing is what makes activations cheaper per sample
    opts = plan["options"]
    assert opts["checkpointing"]["activation_bytes_per_sample"] < 0.6 * opts["no_checkpointing"][
        "activation_bytes_per_sample"]


def test_fake_tensor_activations_are_a_close_lower_bound_of_real_ones():
    """The path big models take without a GPU: shapes only, no kernel workspaces (both sized for a GPU:
    norm layers in fp32 as CUDA autocast runs them)."""
    from imagen_ds.bench.planner import measure_activation_bytes

    cfg = load_config("tiny_res_32").replace(training={"precision": "bf16"})
    real = measure_activation_bytes(cfg, (4,), "cpu")["peaks"][4]
    fake = measure_activation_bytes(cfg, (4,), "fake")["peaks"][4]
    assert 0.85 * real <= fake <= 1.01 * real, (fake, real)


def test_plan_for_the_2b_model_on_8_gpus_prints_a_micro_batch_a_peak_and_assumptions():
    from imagen_ds.bench.planner import format_plan

    result = CliRunner().invoke(main, ["plan", "--model", "2b_res_64", "--gpus", "8", "--gpu-mem", "80", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    # the reference micro-batch (32) fits an 80 GB GPU, with room to spare
    assert plan["config_micro_batch_fits"] and plan["micro_batch"] >= 32
    assert 20 < plan["predicted_peak_gb"] <= 80
    assert plan["model_state_bytes"]["total"] < plan["predicted_peak_gb"] * 2**30
    text = format_plan(plan)  # what the command prints without --json
    assert "largest micro-batch" in text and "predicted peak" in text and "assumptions:" in text
    assert "fake tensors" in text  # no GPU here: it says how activations were sized


def test_plan_rejects_a_bad_gpu_count_in_one_line():
    result = CliRunner().invoke(main, ["plan", "--model", "tiny_res_32", "--gpus", "0"])
    assert result.exit_code == 2
    assert "--gpus" in result.output and "Traceback" not in result.output


def test_benchmark_throughput_json_on_the_tiny_model():
    result = CliRunner().invoke(main, ["benchmark-throughput", "--model", "tiny_res_32", "--steps", "2",
                                       "--warmup", "1", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)  # stdout is exactly one JSON object
    assert {"samples_per_s", "tflops", "mfu", "peak_mem_gb", "overhead_vs_bare"} <= set(report)
    assert report["samples_per_s"] > 0 and report["tflops"] > 0 and report["overhead_vs_bare"] > 0
    assert report["mfu"] is None  # no device peak on a CPU
    assert report["micro_batch"] == 4 and report["step_time_s"]["n"] == 2
    assert report["bare"]["mode"] == "interleaved"
    assert any("attention" in k for k in report["attention_kernels"])
