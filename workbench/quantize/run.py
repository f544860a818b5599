"""`workbench quantize`: a recipe applied to a model, written atomically, then measured against the source
on held-out text (perplexity of both, KL divergence, top-1 agreement) and gated."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch

from ..checkpoint import CONFIG_NAME, Checkpoint, copy_side_files, write_json
from ..errors import BadInput, as_out_of_memory, check_fits
from ..families import check_handled
from ..outputs import atomic_output_dir
from ..hf import quiet_transformers, torch_threads
from ..hub import output_stem
from ..manifest import folder_digest, now, tool_versions, write_manifest
from ..options import QuantizeOptions
from ..quality import compare_final_hidden
from ..readback import SAMPLES as READ_BACK_SAMPLES, SEQ_LEN as READ_BACK_SEQ_LEN, decoded_final_hidden, read_back
from ..runner import Estimate, LayerRunner, estimate, serving_dtype
from .. import experts, kvcache
from . import bnb, compressor, fp8, fp8_block, walk
from ..texts import EVALUATION_TOKENS, calibration_samples, evaluation_blocks
from .recipe import Recipe, load, needs_calibration
from ..safety import remote_code_trusted

# Quality gates by recipe: quantized vs. source on 4096 held-out tokens, with a margin over what the trained
# fixtures measured. FP8 static/dynamic (Llama, Qwen2, merged Llama+LoRA): perplexity -0.06..+0.29%, mean KL
# 3.5e-4..6.5e-4, top-1 96.97..98.05%. Llama, 32 calibration samples x 128 tokens: GPTQ W4A16 -0.07%, 1.6e-4,
# 98.5%; AWQ W4A16 +0.19%, 7.2e-4, 97.1%; W8A8 INT8 +0.03%, 9.5e-5, 99.0%. bitsandbytes NF4 + double
# quantization, Llama: +0.06%, 6.2e-4, 96.8% (FP4 without, Qwen2: +0.27%, 1.5e-3, 94.3%). FP8 block, Llama:
# +0.08%, 2.8e-4, 98.0%. NVFP4A16, Llama: +0.15%, 7.5e-4, 97.4%; MXFP4A16 +0.06%, 1.2e-3, 96.1%; NVFP4 (W4A4,
# 32 x 128 calibration samples) +0.44%, 4.0e-3, 92.7%. (llm-compressor's measured in float32; in bf16, as they are
# judged now: GPTQ -0.08%, 2.2e-4, 98.6%; AWQ -0.08%, 8.4e-4, 96.3%; W8A8 +0.02%, 1.5e-4, 98.3%.)
DEFAULT_GATES = {
    "fp8-static": {"max_ppl_delta": 0.01, "max_kl": 0.005, "min_top1": 0.95},
    "fp8-dynamic": {"max_ppl_delta": 0.01, "max_kl": 0.005, "min_top1": 0.95},
    "fp8-block": {"max_ppl_delta": 0.01, "max_kl": 0.005, "min_top1": 0.95},
    "gptq-w4a16": {"max_ppl_delta": 0.03, "max_kl": 0.01, "min_top1": 0.93},
    "awq-w4a16": {"max_ppl_delta": 0.03, "max_kl": 0.01, "min_top1": 0.93},
    "w8a8-int8": {"max_ppl_delta": 0.01, "max_kl": 0.005, "min_top1": 0.95},
    "bnb-nf4": {"max_ppl_delta": 0.02, "max_kl": 0.01, "min_top1": 0.93},
    "nvfp4-a16": {"max_ppl_delta": 0.03, "max_kl": 0.01, "min_top1": 0.93},
    "mxfp4-a16": {"max_ppl_delta": 0.03, "max_kl": 0.01, "min_top1": 0.93},
    "nvfp4": {"max_ppl_delta": 0.03, "max_kl": 0.02, "min_top1": 0.9},
}
FALLBACK_GATES = {"max_ppl_delta": 0.05, "max_kl": 0.05, "min_top1": 0.9}


def default_output(model: Path, recipe: Recipe) -> Path:
    """Where quantizing writes when no output is named: ``<model>-<recipe name>`` beside the model folder (for a
    hub snapshot, named after its repository, in the working folder)."""
    return Path(f"{output_stem(model)}-{recipe.name}")


def quantize(model_dir: Path, o: QuantizeOptions, on_event=lambda message: None, record: dict | None = None,
             on_progress=None) -> dict:
    """Quantize ``model_dir`` as ``o`` says (options.QuantizeOptions); returns the manifest step, whose status is
    "failed" when a quality gate failed (the artifact is kept). ``record``'s fields are added to the step;
    ``on_progress(done, total)`` follows the calibration samples."""
    from transformers import AutoTokenizer

    quiet_transformers()
    model_dir = Path(model_dir)
    recipe, source, out = _check_inputs(model_dir, o)
    needs = quantize_estimate(source, recipe)
    check_fits(f"to quantize {model_dir.name}", needs.peak_bytes, needs.duration())
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=remote_code_trusted())
    codec = own_codec(recipe)
    # calibrated and judged as an engine runs the model, in the checkpoint's dtype (llm-compressor's formats: the
    # weights compressed-tensors decodes in that dtype, as an engine's kernel dequantizes them)
    runner = LayerRunner(model_dir, dtype=serving_dtype(source))
    targets, ignored, warnings = _select_targets(runner, source, recipe, codec)
    for w in warnings:
        on_event(f"warning: {w}")

    t0, started = time.perf_counter(), now()
    phases: dict[str, float] = {}
    samples = None
    if recipe.calibration is not None and needs_calibration(recipe):
        samples = calibration_samples(tokenizer, recipe.calibration)
    blocks = evaluation_blocks(tokenizer)
    on_event(f"estimated: {needs.describe()}")

    with atomic_output_dir(out, o.force) as tmp:
        if codec is not None:  # formats our own code writes, in one walk through the layer runner
            sha, measured = _quantize_in_one_walk(runner, source, targets, ignored, codec, samples, blocks, tmp,
                                                  phases, on_event, on_progress, recipe.kv_cache is not None)
        else:  # llm-compressor -> compressed-tensors
            sha, measured = _quantize_with_llm_compressor(runner, source, recipe, targets, ignored, samples, blocks, tmp,
                                                          phases, on_event)
        copy_side_files([(model_dir, n) for n in source.side_files() if not (tmp / n).exists()], tmp)
        (tmp / "recipe.yaml").write_text(recipe.source)
        quality, limits, failed = _gate_quality(measured, blocks, recipe, dict(o.gates), tmp, model_dir, phases, on_event)
        step = {
            "verb": "quantize", "started": started, "seconds": round(time.perf_counter() - t0, 2),
            "inputs": {"model": folder_digest(model_dir)},
            "options": _recipe_options(recipe),
            "versions": tool_versions(),
            "metrics": {"layers_quantized": len(targets), "ignored_layers": ignored, **quality,
                        "computed_in": str(runner.dtype).removeprefix("torch."),  # the dtype the report's walks ran in
                        "phase_seconds": {k: round(v, 2) for k, v in phases.items()}},
            "gates": limits, "failed_gates": failed, "warnings": warnings,
            "status": "failed" if failed else "ok",
            **(record or {}),
        }
        write_manifest(tmp, step, parent=model_dir, known_sha256=sha)
    return {"output": str(out.absolute()), **step}


def _check_inputs(model_dir: Path, o: QuantizeOptions) -> tuple[Recipe, Checkpoint, Path]:
    """(the recipe with its overrides, the source checkpoint, the output folder); refuses an already
    quantized source and an existing output without ``o.force``."""
    recipe = load(o.method, o.recipe_path)
    if o.overrides:
        recipe = recipe.with_overrides(**o.overrides)
    source = Checkpoint(model_dir)
    check_handled(source.config, f"quantize {model_dir}")
    if source.config.get("quantization_config"):
        raise BadInput(f"{model_dir} is already quantized ({source.config['quantization_config'].get('quant_method')}); "
                       "quantize the merged bf16/fp16 model")
    out = Path(o.out) if o.out else default_output(model_dir, recipe)
    if out.exists() and not o.force:
        raise BadInput(f"output exists: {out} (use --force to replace it)")
    return recipe, source, out


def _select_targets(runner: LayerRunner, source: Checkpoint, recipe: Recipe,
                    codec: walk.Codec | None) -> tuple[list[str], list[str], list[str]]:
    """(the Linear layers to quantize, the ignored ones by their checkpoint names, warnings); refuses stacked
    expert weights, experts the codec does not write, no target at all, and targets that have no weight of
    their own in the checkpoint or lie outside the decoder layers."""
    arch = (source.config.get("architectures") or ["?"])[0]
    stacked = fp8.stacked_experts(runner.model)
    if stacked:  # not nn.Linear: they would stay unquantized, most of the model, with the report still passing
        raise BadInput(f"{arch} holds weights as stacked 3-D parameters ({stacked[0]}, {len(stacked)} in all) that the "
                       "layer runner cannot split per expert; nothing written")
    routers = experts.routers(runner.model)
    if routers and codec is not None and not codec.writes_experts:
        raise BadInput(f"{arch} is a mixture of experts: {recipe.name} does not quantize experts (fp8 and the "
                       "llm-compressor methods do); nothing written")
    names = [n for n in fp8.linear_modules(runner.model) if n not in routers]
    targets, ignored, warnings = fp8.resolve_targets(names, recipe.ignore)
    ignored = [runner.checkpoint_name(n) for n in ignored + routers]  # as vLLM names them: the checkpoint's names
    if not targets:
        raise BadInput(f"{arch} has no torch.nn.Linear layer to quantize with {recipe.method} besides the ignored "
                       f"{ignored} (Conv1D layers, as in GPT-2, are not supported)")
    absent = [n for n in targets if runner.checkpoint_name(n) + ".weight" not in source.store]
    if absent:
        raise BadInput(f"{absent[0]} has no weight of its own in the checkpoint (tied?); add it to the ignore list")
    walk.check_targets(runner, targets)
    if codec is None:
        weights = [runner.checkpoint_name(t) + ".weight" for t in targets]
        compressor.check_groups(recipe, {n: tuple(source.store.tensors[n].shape) for n in weights})
    return targets, ignored, warnings


def _quantize_in_one_walk(runner: LayerRunner, source: Checkpoint, targets: list[str], ignored: list[str],
                          codec: walk.Codec, samples: torch.Tensor | None, blocks: torch.Tensor, tmp: Path,
                          phases: dict[str, float], on_event, on_progress, kv_cache: bool) -> tuple[dict[str, str], dict]:
    """Calibrate, write and evaluate layer by layer (quantize/walk.py), then config.json with the codec's
    quantization_config (and the KV-cache scales' description); returns (sha256 per written file, the quality
    figures)."""
    calibrating = f"calibrating on {samples.shape[0]} samples x {samples.shape[1]} tokens, " if samples is not None else ""
    on_event(f"{len(targets)} layers: {calibrating}writing and evaluating, one decoder layer at a time")
    try:
        sha, measured, walked = walk.quantize_layers(runner, source, targets, codec, samples, blocks, tmp, on_progress, kv_cache)
    except Exception as exc:
        raise as_out_of_memory(exc, f"quantizing {source.path.name}") or exc from None
    phases.update(walked)
    config = dict(source.config)
    config["quantization_config"] = codec.quantization_config(ignored, str(source.dtype).removeprefix("torch."))
    if kv_cache:
        config["quantization_config"]["kv_cache_scheme"] = kvcache.SCHEME
    write_json(tmp / CONFIG_NAME, config)
    return sha, measured


def _quantize_with_llm_compressor(runner: LayerRunner, source: Checkpoint, recipe: Recipe, targets: list[str],
                                  ignored: list[str], samples: torch.Tensor | None, blocks: torch.Tensor, tmp: Path,
                                  phases: dict[str, float], on_event) -> tuple[dict[str, str], dict]:
    """The source's final hidden states on ``blocks`` first, then llm-compressor writes compressed-tensors,
    then the written artifact is evaluated layer by layer as compressed-tensors decodes it (transformers
    cannot be the evaluator: loading a mixture of experts it fuses the per-expert weights and drops NVFP4's
    global scales); returns (no known sha256, the quality figures)."""
    t = time.perf_counter()
    on_event("source on the evaluation text, layer by layer")
    reference = runner.streams(blocks)
    runner.walk(reference)
    reference_hidden = runner.normed(torch.cat([s.hidden for s in reference]))
    phases["reference"] = time.perf_counter() - t
    on_event(f"llm-compressor {recipe.method} {recipe.scheme} on {len(targets)} layers")
    t = time.perf_counter()
    with torch_threads(1):  # measured here: calibration under contention runs ~4x slower with 2 threads
        compressor.run_oneshot(source.path, replace(recipe, ignore=ignored), samples, tmp, runner.family.experts)
    phases["quantize"] = time.perf_counter() - t
    compressor.check_quantized(tmp, [runner.checkpoint_name(t) for t in targets])
    on_event("evaluating the written artifact layer by layer, as compressed-tensors decodes it")
    t = time.perf_counter()
    measured = compare_final_hidden(runner, reference_hidden, decoded_final_hidden(tmp, runner, blocks), blocks)
    phases["quantized_report"] = time.perf_counter() - t
    return {}, measured


def _gate_quality(measured: dict, blocks: torch.Tensor, recipe: Recipe, gates: dict | None, tmp: Path, model_dir: Path,
          phases: dict[str, float], on_event) -> tuple[dict, dict, list[str]]:
    """(the quality figures, the gates applied, the failed ones): the recipe's gates with the user's on top,
    and the written artifact read back with its format's own library."""
    quality = _quality(measured, blocks)
    limits = {**DEFAULT_GATES.get(recipe.name, FALLBACK_GATES), **(gates or {})}
    failed = _failed_gates(quality, limits)
    t = time.perf_counter()
    on_event("reading the written artifact back with its format's own library, layer by layer")
    read = read_back(tmp, model_dir, blocks[:READ_BACK_SAMPLES, :READ_BACK_SEQ_LEN])
    phases["read_back"] = time.perf_counter() - t
    if read is not None:
        quality["read_back"] = read.as_dict()
        failed += ["read_back"] if read.failures() else []
    return quality, limits, failed


def _recipe_options(recipe: Recipe) -> dict:
    """The manifest step's record of the recipe."""
    return {"recipe": recipe.name, "method": recipe.method, "scheme": recipe.scheme, "format": recipe.format,
            **({"double_quant": recipe.double_quant} if recipe.method == "bnb" else {}),
            **({"kv_cache": recipe.kv_cache} if recipe.kv_cache else {}),
            "ignore": recipe.ignore, "calibration": vars(recipe.calibration) if recipe.calibration else None}


def own_codec(recipe: Recipe) -> walk.Codec | None:
    """The codec for a format the workbench writes itself (one walk), or None (llm-compressor's)."""
    if recipe.format == "fp8":
        return fp8_block.Codec() if recipe.scheme == "block" else fp8.Codec(recipe.scheme)
    if recipe.format == "bitsandbytes":
        return bnb.Codec(recipe.scheme, recipe.double_quant)
    return None


def quantize_estimate(source: Checkpoint, recipe: Recipe) -> Estimate:
    """Own formats: one walk over the calibration and the evaluation tokens (the source and its emulation),
    with the layer's quantized copy. llm-compressor: its run on the offloaded model (compressor.peak_bytes; time:
    the calibration's passes, counted three times for the method's own work), then the report's walks."""
    cal = recipe.calibration.samples * recipe.calibration.seq_len if recipe.calibration else 0
    tokens = EVALUATION_TOKENS
    codec = own_codec(recipe)
    if codec is not None:
        cal = cal if codec.calibrates else 0
        return estimate(source, tokens, passes=2 + cal / tokens, extra_layer_bytes=codec.extra_layer_bytes)
    walked = estimate(source, tokens, passes=1 + cal / tokens)
    return Estimate(max(walked.peak_bytes, compressor.peak_bytes(source, recipe, cal)), walked.seconds * 3)


def _quality(m: dict, blocks: torch.Tensor) -> dict:
    return {
        "eval_tokens": int(blocks.numel()),
        "ppl_source": round(m["ppl_source"], 4), "ppl_quantized": round(m["ppl_quantized"], 4),
        "ppl_delta": round(m["ppl_quantized"] / m["ppl_source"] - 1, 5),
        "mean_kl": m["mean_kl"], "top1_agreement": m["top1_agreement"],
        **({"experts_never_routed": m["experts_never_routed"]} if "experts_never_routed" in m else {}),
    }


def _failed_gates(quality: dict, limits: dict) -> list[str]:
    checks = {
        "max_ppl_delta": quality["ppl_delta"] <= limits["max_ppl_delta"],
        "max_kl": quality["mean_kl"] <= limits["max_kl"],
        "min_top1": quality["top1_agreement"] >= limits["min_top1"],
    }
    return [name for name, ok in checks.items() if not ok]
