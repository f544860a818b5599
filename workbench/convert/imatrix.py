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
    the calibration tokens (a stacked expert tensor: its experts' side by side); ``chunks``: the calibration
    samples, ``tokens``: their tokens in all, ``dataset``: the calibration data it was computed on,
    ``never_routed``: experts no calibration token reached (given their stack's mean)."""
    values: dict[str, np.ndarray]  # GGUF tensor name -> float32 per input column (x experts)
    chunks: int
    tokens: int
    dataset: str
    never_routed: int = 0

    def save(self, path: Path) -> None:
        """Write ``values`` to an .npz, one array per GGUF tensor name, as the quantize script loads it."""
        np.savez(path, **self.values)


@torch.inference_mode()
def importance_matrix(model_dir: Path, gguf_names: dict[str, str], calibration: Calibration = DEFAULT_CALIBRATION,
                      on_layer=None, stacks: dict[str, tuple[str, ...]] | None = None) -> ImportanceMatrix:
    """``gguf_names``: HF weight name -> GGUF tensor name (the converter's plan). Linear layers of the decoder
    only, as llama-imatrix without --process-output. ``stacks``: a stacked GGUF expert tensor -> its experts' HF
    weight names in expert order. Each expert's columns are averaged over the tokens routed to it (what
    llama-imatrix counts per expert), laid out expert after expert as llama.cpp's quantize reads a 3-D tensor's
    matrix (columns x experts); an expert no token reached gets the mean of its stack's others."""
    from transformers import AutoTokenizer

    from ..texts import calibration_samples

    stacks = stacks or {}
    wanted = set(gguf_names) | {name for members in stacks.values() for name in members}
    runner = LayerRunner(model_dir)
    samples = calibration_samples(AutoTokenizer.from_pretrained(model_dir, trust_remote_code=remote_code_trusted()), calibration)
    streams = runner.streams(samples)
    means: dict[str, np.ndarray | None] = {}  # HF weight name -> mean square per input column (None: no token)
    for i in range(runner.num_layers):
        prefix = runner.layer_prefix(i) + "."
        with runner.layer(i) as layer:
            linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear) and f"{prefix}{n}.weight" in wanted}
            sums = {n: _ColumnSquares(m.in_features) for n, m in linears.items()}
            hooks = [m.register_forward_pre_hook(sums[n].hook) for n, m in linears.items()]
            try:
                for s in streams:
                    runner.forward(layer, i, s)
            finally:
                for h in hooks:
                    h.remove()
        means.update({f"{prefix}{n}.weight": total.mean() for n, total in sums.items()})
        if on_layer:
            on_layer(i + 1, runner.num_layers)
    values = {gguf: means[hf] for hf, gguf in gguf_names.items() if means.get(hf) is not None}
    never_routed = 0
    for gguf, members in stacks.items():
        seen = [means[m] for m in members if means.get(m) is not None]
        fill = np.mean(seen, axis=0).astype(np.float32) if seen else None
        never_routed += len(members) - len(seen)
        if fill is not None:
            values[gguf] = np.concatenate([means[m] if means.get(m) is not None else fill for m in members])
    return ImportanceMatrix(values, int(samples.shape[0]), int(samples.numel()), calibration.data, never_routed)


class _ColumnSquares:
    """The sum of each input column's square over the rows a Linear is called with, and how many rows."""

    def __init__(self, columns: int):
        self.total = torch.zeros(columns, dtype=torch.float64)
        self.rows = 0

    def hook(self, _module, args) -> None:
        """A forward pre-hook: add the squares of the Linear's input rows (float64, on the CPU) and count the rows."""
        x = args[0].reshape(-1, args[0].shape[-1]).double()
        self.total.add_((x * x).sum(0).cpu())
        self.rows += x.shape[0]

    def mean(self) -> np.ndarray | None:
        """Each column's mean square as float32; None when no row came (an expert no token was routed to)."""
        return (self.total / self.rows).float().numpy() if self.rows else None
