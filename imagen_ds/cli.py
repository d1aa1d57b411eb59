"""`imagen-ds`: every user command. Thin: parse options, call into the package, print.

Imports of the heavy modules happen inside each command so `imagen-ds --help` is instant.
User errors (ConfigError, DataError) print as one line and exit 2, with no traceback.
"""
from __future__ import annotations

import json
import sys

import click

from imagen_ds.errors import ConfigError, DataError


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (ConfigError, DataError) as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="imagen_ds")
def main():
    """Train and sample the Imagen text-to-image cascade on DeepSpeed."""


def _print_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True))


# --------------------------------------------------------------------------- models


@main.command()
@click.option("--model", "model_name", help="Config name (see `imagen-ds info --list`) or YAML path.")
@click.option("--gpus", default=1, show_default=True, help="Data-parallel ranks for the ZeRO-2 memory estimate.")
@click.option("--list", "list_all", is_flag=True, help="List the predefined configs and exit.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def info(model_name, gpus, list_all, as_json):
    """Parameters, training FLOPs and per-GPU model-state memory of a config."""
    from imagen_ds.bench.info import format_info, list_models, model_info

    if list_all:
        models = list_models()
        _print_json(models) if as_json else click.echo("\n".join(f"{m['name']:16s} {m['description']}" for m in models))
        return
    if not model_name:
        raise ConfigError("info", "--model", "give a config name or YAML path (or --list)")
    report = model_info(model_name, gpus=gpus)
    _print_json(report) if as_json else click.echo(format_info(report))


# --------------------------------------------------------------------------- data (issue 4)


@main.command("make-demo-data")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output shard directory.")
@click.option("--n", "n", default=10000, show_default=True, help="Training samples to draw.")
@click.option("--seed", default=0, show_default=True)
@click.option("--size", default=64, show_default=True, help="Image side in pixels.")
@click.option("--shard-size", default=1000, show_default=True, help="Samples per shard.")
@click.option("--encoder", default="t5-tiny-random", show_default=True,
              help="Precache caption embeddings with this encoder; 'none' writes images and captions only.")
@click.option("--max-tokens", default=64, show_default=True)
def make_demo_data(out, n, seed, size, shard_size, encoder, max_tokens):
    """Synthetic shards of coloured shapes with captions; held-out combinations in OUT/heldout.json."""
    from imagen_ds.data.synthetic import make_demo_data as run

    s = run(out, n, seed=seed, size=size, shard_size=shard_size, max_tokens=max_tokens,
            encoder=None if encoder.lower() == "none" else encoder, progress=True)
    click.echo(f"wrote {s['n']} samples in {s['shards']} shards to {out}; "
               f"{len(s['heldout'])} held-out combinations in {out}/heldout.json")


@main.command("prepare-data")
@click.option("--input", "input_", required=True, type=click.Path(exists=True),
              help="Folder of images with same-named .txt captions, or a .csv/.parquet of path,caption.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output shard directory.")
@click.option("--shard-size", default=1000, show_default=True, help="Samples per shard.")
@click.option("--min-side", default=0, show_default=True, help="Skip images whose shorter side is smaller.")
@click.option("--json", "as_json", is_flag=True, help="Print the counts as one JSON object.")
def prepare_data(input_, out, shard_size, min_side, as_json):
    """Images + captions -> webdataset shards (image, .txt, .json with width/height/source)."""
    from imagen_ds.data.prepare import prepare_data as run

    report = run(input_, out, shard_size=shard_size, min_side=min_side, progress=not as_json)
    if as_json:
        _print_json(report)
    else:
        skipped = ", ".join(f"{k} {v}" for k, v in sorted(report["skipped"].items())) or "none"
        click.echo(f"wrote {report['written']} samples in {report['shards']} shards to {out}; skipped: {skipped}")


@main.command("precache-embeddings")
@click.option("--shards", required=True, help="Input shards: directory, glob or brace pattern.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory (inputs untouched).")
@click.option("--encoder", required=True, help="t5-11b, t5-v1_1-xxl, t5-xxl, t5-tiny-random or a local path.")
@click.option("--max-tokens", default=128, show_default=True)
@click.option("--batch-size", default=64, show_default=True)
@click.option("--device", default=None, help="Default: cuda:LOCAL_RANK if available, else cpu.")
@click.option("--rank", type=int, default=None, help="This process's share of the shards (default env RANK or 0).")
@click.option("--world-size", type=int, default=None, help="Number of processes (default env WORLD_SIZE or 1).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def precache_embeddings(shards, out, encoder, max_tokens, batch_size, device, rank, world_size, as_json):
    """Encode captions once with T5 and write shards with .npy embeddings added (resumable)."""
    from imagen_ds.text.precache import precache_embeddings as run

    s = run(shards, out, encoder, max_tokens=max_tokens, batch_size=batch_size, device=device,
            rank=rank, world_size=world_size, progress=not as_json)
    if as_json:
        _print_json(s)
    else:
        click.echo(f"rank {s['rank']}/{s['world_size']}: {s['written']} shards written, {s['already_done']} already "
                   f"done, {s['encoded']} captions encoded, {s['no_caption']} samples without caption, "
                   f"{len(s['truncated_shards'])} truncated input shards")


@main.command("benchmark-data")
@click.option("--shards", required=True, help="Shard directory, glob or brace pattern.")
@click.option("--model", "model_name", required=True, help="Config whose transforms to run.")
@click.option("--workers", default=None, type=int, help="Loader workers (default: the config's data.workers).")
@click.option("--batches", default=20, show_default=True, help="Batches to time (after one warm-up batch).")
@click.option("--batch-size", default=None, type=int, help="Default: the config's training.micro_batch.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def benchmark_data(shards, model_name, workers, batches, batch_size, as_json):
    """Loader throughput (samples/s) with a model's own transforms, and skip counts."""
    from imagen_ds.data.benchmark import benchmark_data as run, format_report

    report = run(shards, model_name, workers=workers, batches=batches, batch_size=batch_size)
    _print_json(report) if as_json else click.echo(format_report(report))


# --------------------------------------------------------------------------- diffusion, sampling (issue 3)


@main.command()
@click.option("--prompt", "prompts", multiple=True, required=True, help="Text prompt (repeatable).")
@click.option("--base", required=True, help="Base model: run dir, checkpoint dir or exported .safetensors.")
@click.option("--sr256", default=None, help="First super-resolution stage (same forms as --base).")
@click.option("--sr1024", default=None, help="Second super-resolution stage.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory for the PNGs.")
@click.option("--steps", default=None, help="Steps: one value for all stages or one per stage, e.g. 30,20,20.")
@click.option("--guidance", default=None, help="Guidance weight(s), e.g. 7.5,8,7.5 (1 = no guidance).")
@click.option("--sampler", default=None, help="heun | stochastic | ancestral | ddim, one or one per stage.")
@click.option("--threshold", type=click.Choice(["dynamic", "static", "none"]), default=None,
              help="x0 thresholding for all stages (default: each config's).")
@click.option("--aug-level", default=None, help="Noise-augmentation level(s) of the SR stages, in [0, 1].")
@click.option("--seed", default=0, show_default=True, help="Prompt batch k (see --batch) uses seed + k * batch.")
@click.option("--batch", default=8, show_default=True, help="Prompts sampled together.")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
@click.option("--no-ema", is_flag=True, help="Use the raw trained weights instead of the EMA ones.")
def sample(prompts, base, sr256, sr1024, out, steps, guidance, sampler, threshold, aug_level, seed, batch, device,
           no_ema):
    """Sample the cascade: base, then each SR stage from the previous output; writes PNGs and a grid."""
    import torch

    from imagen_ds.diffusion.cascade import Stage, parse_per_stage, sample_cascade
    from imagen_ds.diffusion.images import make_grid, save_images
    from imagen_ds.diffusion.scheme import with_sampling
    from imagen_ds.text import load_encoder
    from imagen_ds.training.checkpoint import load_for_inference

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    paths = [p for p in (base, sr256, sr1024) if p is not None]
    n = len(paths)
    per = dict(steps=parse_per_stage("--steps", steps, n, int), guidance=parse_per_stage("--guidance", guidance, n, float),
               sampler=parse_per_stage("--sampler", sampler, n))
    augs = [None] + parse_per_stage("--aug-level", aug_level, n - 1, float) if n > 1 else [None]
    stages = []
    for i, path in enumerate(paths):
        net, cfg = load_for_inference(path, ema=not no_ema, device=device)
        sampling = with_sampling(cfg.sampling, steps=per["steps"][i], guidance=per["guidance"][i],
                                 sampler=per["sampler"][i], threshold=threshold)
        stages.append(Stage(net, cfg, sampling=sampling, aug_level=augs[i]))
    encoders = {}
    images = []
    for k in range(0, len(prompts), batch):
        chunk = list(prompts[k:k + batch])
        for st in stages:  # each stage reads its own config's encoder (usually all the same one)
            key = (st.cfg.text.encoder, st.cfg.text.max_tokens)
            if key[0] not in encoders:
                encoders[key[0]] = load_encoder(key[0], device=device)
            st.text = encoders[key[0]].encode(chunk, key[1])
        outs = sample_cascade(stages, *stages[0].text, seed=seed + k, progress=True)
        images.append(outs[-1].cpu())
        save_images(outs[-1], out, chunk, start=k)
    grid = torch.cat(images)
    make_grid(grid).save(f"{out}/grid.png")
    click.echo(f"wrote {grid.shape[0]} images ({grid.shape[-1]} px) and grid.png to {out}")


# --------------------------------------------------------------------------- training, export (issue 5)


@main.command()
@click.option("--model", "model_name", required=True, help="Config name or YAML path.")
@click.option("--data", required=True, multiple=True, help="Shard directory, glob, brace pattern or .tar (repeatable).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory: logs, checkpoints.")
@click.option("--steps", type=int, help="Optimizer steps (default: training.samples / global batch).")
@click.option("--samples", type=int, help="Training length in samples seen (instead of --steps).")
@click.option("--resume", is_flag=True, help="Continue from the latest complete checkpoint in --out.")
@click.option("--ds-config", help="DeepSpeed JSON: a name in ds_configs/ or a path (default by precision).")
@click.option("--micro-batch", type=int, help="Override training.micro_batch (per rank).")
@click.option("--global-batch", type=int, help="Override training.global_batch.")
@click.option("--wandb/--no-wandb", default=False, show_default=True, help="Log to Weights & Biases (rank 0).")
@click.option("--seed", default=0, show_default=True)
@click.option("--log-every", type=int, help="Override training.log_every.")
@click.option("--save-every", type=int, help="Override training.save_every.")
@click.option("--nproc", default=1, show_default=True, help="Local ranks, started through DeepSpeed's launcher.")
def train(model_name, data, out, steps, samples, resume, ds_config, micro_batch, global_batch, wandb, seed,
          log_every, save_every, nproc):
    """Train a model on DeepSpeed (ZeRO-2); metrics.jsonl and checkpoints go to --out."""
    if steps is not None and samples is not None:
        raise ConfigError("--steps", str(steps), "give either --steps or --samples, not both")
    argv = ["--model", model_name, "--data", *data, "--out", out, "--seed", str(seed),
            "--wandb" if wandb else "--no-wandb"]
    for flag, value in (("--steps", steps), ("--samples", samples), ("--ds-config", ds_config),
                        ("--micro-batch", micro_batch), ("--global-batch", global_batch),
                        ("--log-every", log_every), ("--save-every", save_every)):
        if value is not None:
            argv += [flag, str(value)]
    if resume:
        argv.append("--resume")
    if nproc > 1:
        from imagen_ds.training.launch import launch_local

        sys.exit(launch_local(nproc, argv))
    from imagen_ds.train import main as train_main

    sys.exit(train_main(argv))


@main.command()
@click.option("--checkpoint", required=True, type=click.Path(exists=True),
              help="Run directory, its checkpoints/ folder or one step_* checkpoint.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output .safetensors file.")
@click.option("--ema/--no-ema", default=True, show_default=True, help="EMA weights (inference) or the raw ones.")
def export(checkpoint, out, ema):
    """Inference weights + the config (as metadata) in one safetensors file."""
    from imagen_ds.training.export import export as run

    s = run(checkpoint, out, ema=ema)
    click.echo(f"wrote {s['out']}: {'EMA' if s['ema'] else 'raw'} weights of {s['checkpoint']} "
               f"(step {s['step']}, {s['params']:,} parameters, {s['bytes'] / 1e6:.1f} MB)")


# --------------------------------------------------------------------------- benchmarks, planner (issue 6)
@main.command("benchmark-throughput")
@click.option("--model", "model_name", required=True, help="Config name or YAML path.")
@click.option("--micro-batch", type=int, default=None, help="Per-GPU batch (default: the config's).")
@click.option("--steps", default=10, show_default=True, help="Timed steps (engine and bare loop each).")
@click.option("--warmup", default=3, show_default=True, help="Untimed steps first.")
@click.option("--ds-config", default=None, help="DeepSpeed JSON (name in ds_configs/ or path).")
@click.option("--compile", "use_compile", is_flag=True, help="torch.compile the model (fuses GroupNorm+SiLU).")
@click.option("--peak-tflops", type=float, default=None, help="Device peak for MFU (default: by GPU name).")
@click.option("--gpu-mem-cap", type=float, default=None, help="Cap this process's GPU memory (GiB).")
@click.option("--no-bare", is_flag=True, help="Skip the bare PyTorch baseline.")
@click.option("--threads", type=click.IntRange(1), default=None, help="CPU intra-op threads (default: torch's).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def benchmark_throughput(model_name, micro_batch, steps, warmup, ds_config, use_compile, peak_tflops,
                         gpu_mem_cap, no_bare, threads, as_json):
    """Training samples/s, TFLOP/s, MFU and peak memory of the real engine, vs a bare PyTorch loop."""
    import contextlib

    from imagen_ds.bench.throughput import benchmark, format_report, stdout_to_stderr

    with stdout_to_stderr() if as_json else contextlib.nullcontext():
        report = benchmark(model_name, micro_batch=micro_batch, steps=steps, warmup=warmup, ds_config=ds_config,
                           compile=use_compile, peak_tflops=peak_tflops, gpu_mem_cap=gpu_mem_cap, bare=not no_bare,
                           threads=threads)
    _print_json(report) if as_json else click.echo(format_report(report))


@main.command()
@click.option("--model", "model_name", required=True, help="Config name or YAML path.")
@click.option("--gpus", default=8, show_default=True, help="Data-parallel ranks (ZeRO shards over them).")
@click.option("--gpu-mem", type=float, default=80.0, show_default=True, help="Memory per GPU (GiB).")
@click.option("--zero", "zero_stage", type=click.IntRange(0, 3), default=None, help="ZeRO stage (default: config's).")
@click.option("--measure-on", type=click.Choice(["auto", "cuda", "cpu", "fake"]), default="auto", show_default=True,
              help="Where activations are measured: the GPU, the CPU (small models), or shapes only (fake tensors).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def plan(model_name, gpus, gpu_mem, zero_stage, measure_on, as_json):
    """Largest micro-batch that fits per GPU, with the predicted peak memory and its assumptions."""
    from imagen_ds.bench.planner import format_plan, make_plan

    report = make_plan(model_name, gpus=gpus, gpu_mem_gb=gpu_mem, zero_stage=zero_stage, measure_on=measure_on)
    _print_json(report) if as_json else click.echo(format_plan(report))



# --------------------------------------------------------------------------- evaluation (issue 7)


@main.command()
@click.option("--checkpoints", required=True, multiple=True,
              help="Base-model checkpoints (run dir, checkpoint dir or .safetensors); repeat the option or "
                   "list them comma-separated.")
@click.option("--prompts", required=True, help=".txt (one per line), .jsonl, or .json (list / COCO captions file).")
@click.option("--ref-images", required=True, help="Reference images: a folder of images or webdataset shards.")
@click.option("--guidance", default="1,2,4,6", show_default=True, help="Comma-separated guidance weights.")
@click.option("--num-samples", type=int, default=None, help="Images per point (default: one per prompt).")
@click.option("--steps", type=int, default=None, help="Sampling steps (default: each config's).")
@click.option("--sampler", default=None, help="heun | stochastic | ancestral | ddim (any works with either scheme).")
@click.option("--out", default="eval_out", show_default=True)
@click.option("--inception-weights", default=None,
              help="torch-fidelity's pt_inception-2015-12-05 .pth, or 'tiny-random' (offline mechanics check).")
@click.option("--clip-model", default="openai/clip-vit-large-patch14", show_default=True,
              help="CLIP model directory or hub name, or 'clip-tiny-random'.")
@click.option("--sr256", default=None, help="SR checkpoint 64->256 for cascade samples.")
@click.option("--sr1024", default=None, help="SR checkpoint 256->1024 (needs --sr256).")
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default=None, help="Default: cuda if available, else cpu.")
@click.option("--max-ref-images", type=int, default=None, help="Use only the first N reference images.")
def evaluate(checkpoints, prompts, ref_images, guidance, num_samples, steps, sampler, out, inception_weights,
             clip_model, sr256, sr1024, batch_size, seed, device, max_ref_images):
    """FID and CLIP score for each checkpoint x guidance weight: results.json, results.md, fid_vs_clip.png."""
    from imagen_ds.eval.sweep import SweepSettings, run_sweep

    try:
        weights = [float(w) for w in guidance.split(",") if w.strip()]
    except ValueError:
        raise ConfigError("--guidance", guidance, "expected comma-separated numbers like 1,2,4,6") from None
    ckpts = [c for arg in checkpoints for c in arg.split(",") if c]
    results = run_sweep(SweepSettings(
        checkpoints=ckpts, prompts=prompts, ref_images=ref_images, guidance=weights, out=out,
        num_samples=num_samples, steps=steps, sampler=sampler, inception_weights=inception_weights,
        clip_model=clip_model, sr256=sr256, sr1024=sr1024, batch_size=batch_size, seed=seed, device=device,
        max_ref_images=max_ref_images))
    for r in results["results"]:
        click.echo(f"{r['label']}  w={r['guidance']:g}  FID {r['fid']:.4g}  CLIP {r['clip_score']:.3f}")
    click.echo(f"wrote {out}/results.json, results.md, fid_vs_clip.png")


# --------------------------------------------------------------------------- demo (issue 8)


@main.command()
@click.option("--out", default="demo_out", show_default=True, help="Folder for data, checkpoint, grid and summary.json.")
@click.option("--minutes", type=float, default=10.0, show_default=True, help="Training budget in wall-clock minutes.")
@click.option("--steps", type=int, default=None, help="Stop after this many optimizer steps (also with --minutes).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--images", "n_images", type=int, default=10000, show_default=True, help="Synthetic training images.")
@click.option("--per-caption", type=int, default=8, show_default=True, help="Samples per held-out caption.")
@click.option("--sample-steps", type=int, default=None, help="Sampler steps (default: the model config's).")
@click.option("--precision", type=click.Choice(["auto", "bf16", "fp32"]), default="auto", show_default=True,
              help="auto: bf16 where the CPU computes it natively, else fp32.")
@click.option("--docs/--no-docs", "to_docs", default=True, show_default=True,
              help="Copy the grid to the repository's docs/demo.png.")
def demo(out, minutes, steps, seed, n_images, per_caption, sample_steps, precision, to_docs):
    """Train a small text-to-image model offline on CPU and check it follows held-out captions."""
    from imagen_ds.demo import run_demo

    if minutes is not None and minutes <= 0:
        minutes = None
    if minutes is None and steps is None:
        raise ConfigError("imagen-ds demo", "--minutes", "give a positive --minutes or --steps")
    kw = {} if to_docs else {"docs_png": None}
    run_demo(out, minutes=minutes, steps=steps, seed=seed, n_images=n_images, per_caption=per_caption,
             precision=precision, sample_steps=sample_steps, **kw)


if __name__ == "__main__":
    main()
