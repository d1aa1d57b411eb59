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
@click.option("--model", "model_name", required=True, help="Config name (see `imagen-ds info --list`) or YAML path.")
@click.option("--gpus", default=1, show_default=True, help="Data-parallel ranks for the ZeRO-2 memory estimate.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def info(model_name, gpus, as_json):
    """Parameters, training FLOPs and per-GPU model-state memory of a config."""
    from imagen_ds.bench.info import model_info, format_info

    report = model_info(model_name, gpus=gpus)
    _print_json(report) if as_json else click.echo(format_info(report))


# --------------------------------------------------------------------------- data (issue 4)


# --------------------------------------------------------------------------- diffusion, sampling (issue 3)


# --------------------------------------------------------------------------- training, export (issue 5)


# --------------------------------------------------------------------------- benchmarks, planner (issue 6)


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
@click.option("--sampler", default=None, help="heun | stochastic (EDM), ancestral | ddim (DDPM).")
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


if __name__ == "__main__":
    main()
