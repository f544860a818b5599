"""GPTQ, AWQ, INT8 W8A8 (and FP8 in the compressed-tensors format) through llm-compressor's ``oneshot``,
written in the compressed-tensors format that vLLM and SGLang read. llm-compressor calibrates layer by
layer (its sequential pipeline), so a model needs memory for its weights plus one layer's activations."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path

import torch

from ..errors import EnvironmentProblem
from .recipe import Recipe
from ..safety import remote_code_trusted


# the workbench's fp8 schemes as llm-compressor's preset schemes
FP8_SCHEMES = {"static": "FP8", "dynamic": "FP8_DYNAMIC", "block": "FP8_BLOCK"}


def _modifiers(recipe: Recipe) -> list:
    from llmcompressor.modifiers.awq import AWQModifier
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

    ignore = list(recipe.ignore)
    build = {
        "gptq": lambda: [GPTQModifier(targets="Linear", scheme="W4A16", ignore=ignore, actorder=recipe.actorder)],
        "awq": lambda: [AWQModifier(targets="Linear", scheme="W4A16_ASYM", ignore=ignore)],
        "w8a8": lambda: [SmoothQuantModifier(smoothing_strength=recipe.smoothing_strength),
                         GPTQModifier(targets="Linear", scheme="W8A8", ignore=ignore)],
        "fp8": lambda: [QuantizationModifier(targets="Linear", scheme=FP8_SCHEMES[recipe.scheme], ignore=ignore)],
        "fp4": lambda: [QuantizationModifier(targets="Linear", scheme=recipe.scheme.upper(), ignore=ignore)],
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


def run_oneshot(model_dir: Path, recipe: Recipe, samples: torch.Tensor | None, folder: Path) -> None:
    """Quantize a fresh copy of the model (in its own dtype) and save it compressed into ``folder``.
    llm-compressor's own output goes to a log, kept and named in the error only if it fails."""
    log = Path(tempfile.mkstemp(prefix=f"workbench-{recipe.method}-", suffix=".log")[1])
    try:
        with _output_to(log):
            from datasets import Dataset
            from llmcompressor import oneshot
            from transformers import AutoModelForCausalLM

            _cpu_without_pinning()
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto", trust_remote_code=remote_code_trusted())
            kwargs = {}
            if samples is not None:
                data = {"input_ids": samples.tolist(), "attention_mask": torch.ones_like(samples).tolist()}
                kwargs = {"dataset": Dataset.from_dict(data), "max_seq_length": samples.shape[1],
                          "num_calibration_samples": samples.shape[0],
                          # the samples are already drawn with the recipe's seed; its own shuffle is unseeded and
                          # makes GPTQ's sums (and so the weights) differ run to run
                          "shuffle_calibration_samples": False}
            oneshot(model=model, recipe=_modifiers(recipe), **kwargs)
            model.save_pretrained(folder, save_compressed=True)
    except Exception as exc:  # llm-compressor raises many kinds; the log has its story
        raise EnvironmentProblem(f"llm-compressor {recipe.method} failed: {str(exc).splitlines()[0]} (log: {log})") from None
    log.unlink()


# methods whose artifacts are evaluated in the source's dtype: compressed-tensors decompresses 4-bit floats
# into the checkpoint's dtype, which float32 activations cannot multiply
EVALUATED_IN_SOURCE_DTYPE = ("fp4",)


def compare_written(folder: Path, runner, reference_hidden: torch.Tensor, blocks: torch.Tensor,
                    dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """The written artifact (loaded whole in transformers, in ``dtype``: compressed-tensors decompresses it, as
    llm-compressor held the whole model anyway) against the source's final hidden states from the layer
    runner, through the same unquantized lm_head; its loading output is captured."""
    from transformers import AutoModelForCausalLM

    from ..quality import compare_final_hidden

    with tempfile.NamedTemporaryFile(prefix="workbench-eval-", suffix=".log") as log, _output_to(Path(log.name)):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=remote_code_trusted()).eval()
    finals: list[torch.Tensor] = []  # the decoder's output (after its final norm), through the whole model's
    # forward: compressed-tensors decompresses on the model's own call
    hook = model.get_decoder().register_forward_hook(lambda _m, _a, out: finals.append(out.last_hidden_state))
    with torch.inference_mode():
        for b in blocks.split(4):
            model(input_ids=b)
    hook.remove()
    del model
    hidden = torch.cat(finals).float()
    return compare_final_hidden(runner, reference_hidden, hidden.reshape(-1, hidden.shape[-1]), blocks)
