"""GPTQ, AWQ, INT8 W8A8, NVFP4/MXFP4 (and FP8 in the compressed-tensors format) through llm-compressor's
``oneshot``, written in the compressed-tensors format that vLLM and SGLang read. The model is loaded with every
weight left on disk (compressed-tensors' offloading over accelerate's disk map: reads from the checkpoint's own
safetensors, writes what the methods change under the output's temporary folder); llm-compressor's sequential
pipeline onloads one decoder layer at a time, and the save gathers one shard of at most SAVE_SHARD at a time, so
memory is about one layer plus the method's calibration state, whatever the depth. A mixture of experts is linearized by llm-compressor (one Linear per expert, every expert
calibrated on every token) and saved under the checkpoint's own expert names."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from .. import kvcache
from ..checkpoint import LAYER_NAME, Checkpoint, numel
from ..errors import ArtifactFailed, BadInput, EnvironmentProblem
from ..families import ExpertLayout
from ..hf import library_logs_to_stderr
from ..runner import BASE_RSS
from .recipe import Recipe
from ..safety import remote_code_trusted


# the workbench's fp8 schemes as llm-compressor's preset schemes
FP8_SCHEMES = {"static": "FP8", "dynamic": "FP8_DYNAMIC", "block": "FP8_BLOCK"}


# --kv-cache kinds as compressed-tensors' kv_cache_scheme: one static scale per tensor, calibrated by
# llm-compressor on the keys and values the attention sees (written as <attention>.k_scale / v_scale)
KV_CACHE_SCHEMES = {"fp8": kvcache.SCHEME}
# (method, scheme) -> the input channels one weight scale covers in llm-compressor's preset scheme: a weight
# whose input is not a whole number of groups is refused by it deep in its run ("strict division"); FP8_BLOCK
# it writes, but compressed-tensors cannot quantize such an input in its groups of 128 (measured: 96 channels)
GROUP_SIZES = {("gptq", "w4a16"): 128, ("awq", "w4a16"): 128, ("fp4", "nvfp4a16"): 16, ("fp4", "nvfp4"): 16,
               ("fp4", "mxfp4a16"): 32, ("fp8", "block"): 128}
# the parameters a method changes, kept on disk while the model is offloaded: inside the output's temporary
# folder, so a failed or killed run's copy goes with it
OFFLOAD_DIR = ".offload"
# transformers gathers each shard of an offloaded model in memory to write it (llm-compressor's default: 20GB)
SAVE_SHARD_BYTES = 10**9
SAVE_SHARD = f"{SAVE_SHARD_BYTES // 10**9}GB"
# the projection names llm-compressor gives a linearized expert
LINEAR_EXPERT_NAMES = ExpertLayout("gate_proj", "up_proj", "down_proj")


def check_groups(recipe: Recipe, shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse (naming the first) a target weight, by checkpoint name -> shape, whose input channels are not
    whole groups of the recipe's scheme."""
    group = GROUP_SIZES.get((recipe.method, recipe.scheme))
    for name, shape in shapes.items():
        if group and shape[-1] % group:
            raise BadInput(f"{name}: its {shape[-1]} input channels are not whole groups of {group}, as {recipe.name} "
                           "quantizes them; add the module to the ignore list or use another method; nothing written")


def _modifiers(recipe: Recipe) -> list:
    from llmcompressor.modifiers.awq import AWQModifier
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

    common = {"targets": "Linear", "ignore": list(recipe.ignore),
              **({"kv_cache_scheme": KV_CACHE_SCHEMES[recipe.kv_cache]} if recipe.kv_cache else {})}
    build = {
        "gptq": lambda: [GPTQModifier(scheme="W4A16", actorder=recipe.actorder, **common)],
        "awq": lambda: [AWQModifier(scheme="W4A16_ASYM", **common)],
        "w8a8": lambda: [SmoothQuantModifier(smoothing_strength=recipe.smoothing_strength),
                         GPTQModifier(scheme="W8A8", **common)],
        "fp8": lambda: [QuantizationModifier(scheme=FP8_SCHEMES[recipe.scheme], **common)],
        "fp4": lambda: [QuantizationModifier(scheme=recipe.scheme.upper(), **common)],
    }
    return build[recipe.method]()


def _cpu_without_pinning() -> None:
    """llm-compressor pins its cached activations for faster host-to-GPU copies; without an accelerator
    torch refuses to pin ("Cannot access accelerator device"), and pinning would buy nothing."""
    if not torch.cuda.is_available():
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None


@contextlib.contextmanager
def _output_to(log: Path):
    """Send this process's stdout and stderr (file descriptors, so loguru and tqdm too) to ``log``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(log, "ab") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def _expert_renamings(layout: ExpertLayout | None) -> list:
    """transformers' renamings from the checkpoint's expert projection names to llm-compressor's: reverted on
    save, they give the written experts the checkpoint's names (Mixtral's w1/w3/w2), which engines load by."""
    from transformers.core_model_loading import WeightRenaming

    if layout is None:
        return []
    pairs = zip((layout.gate, layout.up, layout.down), (LINEAR_EXPERT_NAMES.gate, LINEAR_EXPERT_NAMES.up, LINEAR_EXPERT_NAMES.down))
    return [WeightRenaming(source_patterns=rf"\.experts\.(\d+)\.{ours}\.", target_patterns=rf".experts.\1.{theirs}.")
            for ours, theirs in pairs if ours != theirs]


def run_oneshot(model_dir: Path, recipe: Recipe, samples: torch.Tensor | None, folder: Path,
                experts: ExpertLayout | None = None) -> None:
    """Quantize a fresh copy of the model (in its own dtype; ``experts``: the family's expert layout, for a
    mixture of experts) and save it compressed into ``folder``. llm-compressor's own output goes to a log,
    kept and named in the error only if it fails."""
    log = Path(tempfile.mkstemp(prefix=f"workbench-{recipe.method}-", suffix=".log")[1])
    try:
        with _output_to(log):
            _quantize_and_save(model_dir, recipe, samples, folder, experts)
    except Exception as exc:  # llm-compressor raises many kinds; the log has its story
        raise EnvironmentProblem(f"llm-compressor {recipe.method} failed: {str(exc).splitlines()[0]} (log: {log})") from None
    finally:
        library_logs_to_stderr("WARNING")
    log.unlink()


def _quantize_and_save(model_dir: Path, recipe: Recipe, samples: torch.Tensor | None, folder: Path,
                       experts: ExpertLayout | None) -> None:
    from datasets import Dataset

    with contextlib.redirect_stdout(sys.stderr):  # its import logs (to stdout) already
        from llmcompressor import oneshot
        from llmcompressor.modeling.moe.linearize import linearize_moe
    library_logs_to_stderr("INFO")  # after llm-compressor's import set them up; the log, while it holds stderr
    _cpu_without_pinning()
    model = _load_offloaded(model_dir, folder / OFFLOAD_DIR)
    linearize_moe(model)  # stacked experts -> one Linear each; nothing for a dense model
    kwargs = {}
    if samples is not None:
        data = {"input_ids": samples.tolist(), "attention_mask": torch.ones_like(samples).tolist()}
        kwargs = {"dataset": Dataset.from_dict(data), "max_seq_length": samples.shape[1],
                  "num_calibration_samples": samples.shape[0],
                  # the samples are already drawn with the recipe's seed; its own shuffle is unseeded and
                  # makes GPTQ's sums (and so the weights) differ run to run
                  "shuffle_calibration_samples": False}
    oneshot(model=model, recipe=_modifiers(recipe), **kwargs)
    model._weight_conversions = list(getattr(model, "_weight_conversions", None) or []) + _expert_renamings(experts)
    model.save_pretrained(folder, save_compressed=True, max_shard_size=SAVE_SHARD)
    del model
    shutil.rmtree(folder / OFFLOAD_DIR, ignore_errors=True)


def peak_bytes(source: Checkpoint, recipe: Recipe, calibration_tokens: int) -> int:
    """llm-compressor's peak memory on the offloaded model: the imports, one decoder layer in its dtype and the
    largest of what the method adds to it: GPTQ (gptq, w8a8) one float32 Hessian per target of the layer plus
    two for the largest one's factorization and two float32 copies of its weight (measured at the 8B width,
    2 layers: 4211 MiB); AWQ the layer twice in float32 (its scale search) and its inputs;
    the calibration's last subgraph, the lm_head and its logits; the save, one shard and its largest tensor."""
    cfg = source.config.get("text_config", source.config)
    hidden, vocab = int(cfg.get("hidden_size", 0)), int(cfg.get("vocab_size", 0))
    size = source.dtype.itemsize
    layers: dict[str, list[tuple[int, ...]]] = {}
    for name, info in source.store.tensors.items():
        found = LAYER_NAME.match(name)
        if found and name.endswith(".weight") and len(info.shape) == 2:
            layers.setdefault(found.group(1), []).append(tuple(info.shape))
    shapes = max(layers.values(), key=lambda s: sum(numel(x) for x in s), default=[(0, 0)])
    layer = sum(numel(x) for x in shapes)
    largest_input = max(x[1] for x in shapes)
    largest_weight = max(numel(x) for x in shapes)
    states = {"gptq": sum(x[1] ** 2 for x in shapes) * 4 + 2 * largest_input ** 2 * 4 + 2 * largest_weight * 4,
              "awq": 2 * layer * 4 + 4 * calibration_tokens * max(max(x) for x in shapes) * 4}
    state = states.get("gptq" if recipe.method == "w8a8" else recipe.method, 2 * largest_weight * 4)
    head = (vocab * hidden + calibration_tokens * vocab) * size if calibration_tokens else 0
    save = SAVE_SHARD_BYTES + largest_weight * size
    return int(BASE_RSS + layer * size + max(state, head, save))


def _load_offloaded(model_dir: Path, offload: Path):
    """The model with no weight in memory (an accelerate device map of the disk alone, converted to
    compressed-tensors' offloading, which llm-compressor's pipelines onload layer by layer)."""
    from compressed_tensors.offload import load_offloaded_model
    from transformers import AutoModelForCausalLM

    with load_offloaded_model():
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto", device_map="auto", max_memory={"cpu": 0},
                                                    offload_folder=str(offload), trust_remote_code=remote_code_trusted())


def check_quantized(folder: Path, targets: list[str]) -> None:
    """Every target module (by checkpoint name) was written quantized (it has a ``weight_scale``): what
    llm-compressor left in 16 bits would otherwise pass unnoticed under a report of the rest."""
    written = Checkpoint(folder).store.tensors
    missing = [t for t in targets if t + ".weight_scale" not in written]
    if missing:
        raise ArtifactFailed(f"llm-compressor left {len(missing)} of the {len(targets)} target modules unquantized or "
                             f"wrote them under other names, e.g. {missing[0]}; nothing written")
