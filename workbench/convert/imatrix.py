"""llama.cpp's importance matrix, computed with the layer runner: for every matrix llama.cpp multiplies with
activations, the mean of each input column's square over the calibration tokens (what ``llama-imatrix``
accumulates as ``in_sum2 / counts``). llama.cpp's quantize weighs each weight's rounding error by it (K-
and IQ-quants), and its lowest IQ types need it.

Computed here rather than with ``llama-imatrix`` (a tool llama-cpp-python does not ship) from the same
activations: the HF model's Linear inputs, layer by layer, in float32. It is handed to llama.cpp's own
``llama_model_quantize`` through its C API (``llama_model_imatrix_data``), keyed by GGUF tensor name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..runner import LayerRunner
from ..safety import remote_code_trusted
from ..options import Calibration

# llama-imatrix's usual run: chunks of 512 tokens; 32 of them keep a CPU walk short
DEFAULT_CALIBRATION = Calibration(samples=32, seq_len=512)


@dataclass
class ImportanceMatrix:
    """llama.cpp's importance matrix of one model: per GGUF tensor, the mean square of each input column over
    the calibration tokens; ``chunks``: the calibration samples, ``tokens``: their tokens in all, ``dataset``: the
    calibration data it was computed on."""
    values: dict[str, np.ndarray]  # GGUF tensor name -> float32 per input column
    chunks: int
    tokens: int
    dataset: str

    def save(self, path: Path) -> None:
        np.savez(path, **self.values)


@torch.inference_mode()
def importance_matrix(model_dir: Path, gguf_names: dict[str, str], calibration: Calibration = DEFAULT_CALIBRATION,
                      on_layer=None) -> ImportanceMatrix:
    """``gguf_names``: HF weight name -> GGUF tensor name (the converter's plan). Linear layers of the decoder
    only, as llama-imatrix without --process-output."""
    from transformers import AutoTokenizer

    from ..texts import calibration_samples

    runner = LayerRunner(model_dir)
    samples = calibration_samples(AutoTokenizer.from_pretrained(model_dir, trust_remote_code=remote_code_trusted()), calibration)
    streams = runner.streams(samples)
    values: dict[str, np.ndarray] = {}
    for i in range(runner.num_layers):
        prefix = runner.layer_prefix(i) + "."
        with runner.layer(i) as layer:
            linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear) and f"{prefix}{n}.weight" in gguf_names}
            sums = {n: torch.zeros(m.in_features, dtype=torch.float64) for n, m in linears.items()}
            hooks = [m.register_forward_pre_hook(_accumulate(sums[n])) for n, m in linears.items()]
            try:
                for s in streams:
                    runner.forward(layer, i, s)
            finally:
                for h in hooks:
                    h.remove()
        for n, total in sums.items():
            values[gguf_names[f"{prefix}{n}.weight"]] = (total / samples.numel()).float().numpy()
        if on_layer:
            on_layer(i + 1, runner.num_layers)
    return ImportanceMatrix(values, int(samples.shape[0]), int(samples.numel()), calibration.data)


def _accumulate(total: torch.Tensor):
    def hook(_module, args):
        x = args[0].reshape(-1, args[0].shape[-1]).double()
        total.add_((x * x).sum(0).cpu())
    return hook
