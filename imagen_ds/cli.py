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


# --------------------------------------------------------------------------- demo (issue 8)


if __name__ == "__main__":
    main()
