"""The command line: each command parses options, calls one function of its verb module, and reports.

Exit codes: 0 ok, 1 the artifact failed a check, 2 usage or bad input, 3 engine or environment missing.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
from pathlib import Path

import click

from . import __version__
from .errors import WorkbenchError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*$", re.I)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(value: str | None) -> int | None:
    if value is None:
        return None
    m = _SIZE.match(value)
    if not m:
        raise click.BadParameter(f"{value!r} is not a size like 500MB or 2GB")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()])


class _Group(click.Group):
    """Turns workbench errors into one line on stderr and their exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except WorkbenchError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="workbench")
def cli():
    """Take a fine-tuned LLM from training output to a release artifact that is proven to serve.

    Every command writes its output to a temporary folder beside the destination and renames it into
    place only when complete; an existing output is replaced only with --force. Each artifact carries a
    workbench.json manifest: inputs with their sha256, options, tool versions and check figures.
    """


def _progress(enabled: bool, label: str):
    """A rich progress bar on stderr (only on a terminal): (context manager, callback(done, total))."""
    if not enabled or not sys.stderr.isatty():
        return contextlib.nullcontext(), None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    bar = Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=Console(stderr=True), transient=True)
    task = bar.add_task(label, total=None)
    return bar, lambda done, total: bar.update(task, completed=done, total=total)


@cli.command()
@click.argument("base", type=click.Path(path_type=Path))
@click.argument("adapter", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), help="Output folder. Default: ADAPTER path + '-merged'.")
@click.option("--dtype", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto", show_default=True,
              help="dtype of the merged weights; auto keeps the base's. The merge itself is always float32.")
@click.option("--max-shard-size", help="Largest output shard, e.g. 2GB. Default: the base's largest shard.")
@click.option("--force", is_flag=True, help="Replace the output folder if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest step as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar, no summary.")
def merge(base, adapter, out, dtype, max_shard_size, force, as_json, quiet):
    """Fold a LoRA ADAPTER (peft folder) into its BASE model, streamed tensor by tensor.

    Handles LoRA, rsLoRA, DoRA, rank/alpha patterns, regex targets, layers_to_transform,
    fan_in_fan_out, modules_to_save, resized vocabularies and tied embeddings. The tokenizer, chat
    template and generation config come from the adapter folder when it has them, else from the base.
    Everything is checked before anything is written.
    """
    from .merge import default_output, plan_merge, run_merge

    shard_bytes = parse_size(max_shard_size)
    plan = plan_merge(base, adapter, dtype)
    for warning in plan.warnings:
        click.echo(f"warning: {warning}", err=True)
    out = out or default_output(adapter)
    bar, on_tensor = _progress(not quiet and not as_json, "merging")
    options = {"base": str(base), "adapter": str(adapter), "out": str(out), "dtype_option": dtype}
    with bar:
        step = run_merge(plan, out, force, shard_bytes, options, on_tensor)
    if as_json:
        click.echo(json.dumps({"output": str(Path(out).absolute()), **step}, indent=2))
    elif not quiet:
        m = step["metrics"]
        click.echo(f"merged {m['lora_modules_merged']} LoRA modules ({m['dora_modules']} DoRA), "
                   f"replaced {m['tensors_replaced']} tensors, wrote {m['tensors_written']} tensors "
                   f"in {m['shards']} shard(s) as {step['options']['dtype']} in {step['seconds']:.1f}s")
        click.echo(f"self-check: {m['self_check_modules']} modules, max relative error "
                   f"{m['self_check_max_rel_error']:.2e} vs. W·x + s·B(A·x) in float64")
        click.echo(f"output: {Path(out).absolute()}")


def main():
    cli(prog_name="workbench")
