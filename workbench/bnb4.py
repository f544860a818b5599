"""bitsandbytes 4-bit (NF4 / FP4), the checkpoint transformers saves for a model loaded with
``BitsAndBytesConfig(load_in_4bit=True)``: per quantized Linear, ``weight`` packed two 4-bit codes per
uint8 byte (shape [numel/2, 1]), ``weight.absmax`` (the block scales; uint8 with ``weight.nested_absmax``
and ``weight.nested_quant_map`` under double quantization), ``weight.quant_map`` (the 16 code values) and
``weight.quant_state.bitsandbytes__<type>`` (the rest of bitsandbytes' QuantState as JSON bytes).

The quantization itself is bitsandbytes' own ``quantize_4bit``, exactly what transformers runs at load
time, so the file is what transformers would save; written here only to stream it one layer at a time
(transformers would load the whole model first). The same round trip serves the QLoRA-faithful merge, so the
layout lives here, below both verbs (quantize/bnb.py is its codec in the quantize walk).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .checkpoint import PlannedTensor

NESTED_BLOCKSIZE = 256  # bitsandbytes' block size for the double quantization of the block scales
CODES = 16  # 4-bit code book
# the packed QuantState JSON is padded with spaces to a fixed length (the writer plans every size before
# any layer is quantized; JSON allows trailing whitespace, and bitsandbytes parses it with json.loads)
STATE_BYTES = 256


@dataclass(frozen=True)
class Bnb4bit:
    """How bitsandbytes quantizes a weight at load time: transformers' BitsAndBytesConfig defaults (block
    size 64, uint8 storage)."""

    quant_type: str = "nf4"  # "nf4" | "fp4"
    double_quant: bool = True
    blocksize: int = 64

    def _quantize(self, weight: torch.Tensor):
        import bitsandbytes.functional as F

        return F.quantize_4bit(weight, blocksize=self.blocksize, quant_type=self.quant_type,
                               compress_statistics=self.double_quant, quant_storage=torch.uint8)

    def round_trip(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight as bitsandbytes computes with it: quantized, dequantized (float32)."""
        import bitsandbytes.functional as F

        packed, state = self._quantize(weight)
        state.dtype = torch.float32
        return F.dequantize_4bit(packed, state)

    def tensors(self, name: str, weight: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """(the tensors transformers saves for ``name`` (a ".weight"), in plan order; the dequantized
        weight in its own dtype, what the loaded layer computes with)."""
        import bitsandbytes.functional as F

        packed, state = self._quantize(weight)
        parts = state.as_dict(packed=True)
        state_key = f"quant_state.bitsandbytes__{self.quant_type}"
        text = bytes(parts[state_key].numpy()).decode()
        if len(text) > STATE_BYTES:
            raise RuntimeError(f"bitsandbytes quant state of {name} is {len(text)} bytes, more than {STATE_BYTES}")
        parts[state_key] = torch.frombuffer(bytearray(text.ljust(STATE_BYTES).encode()), dtype=torch.uint8)
        out = {name: packed}
        for suffix in self._suffixes():
            out[f"{name}.{suffix}"] = parts[suffix]
        return out, F.dequantize_4bit(packed, state)

    def _suffixes(self) -> list[str]:
        nested = ["nested_absmax", "nested_quant_map"] if self.double_quant else []
        return ["absmax", *nested, "quant_map", f"quant_state.bitsandbytes__{self.quant_type}"]

    def planned(self, name: str, shape: tuple[int, ...]) -> list[PlannedTensor]:
        """What ``tensors`` writes for ``name`` of ``shape``, in the same order, sized before any layer is quantized."""
        numel = math.prod(shape)
        blocks = math.ceil(numel / self.blocksize)
        sizes = {
            "absmax": (torch.uint8 if self.double_quant else torch.float32, (blocks,)),
            "nested_absmax": (torch.float32, (math.ceil(blocks / NESTED_BLOCKSIZE),)),
            "nested_quant_map": (torch.float32, (256,)),
            "quant_map": (torch.float32, (CODES,)),
            f"quant_state.bitsandbytes__{self.quant_type}": (torch.uint8, (STATE_BYTES,)),
        }
        return [PlannedTensor(name, torch.uint8, ((numel + 1) // 2, 1)),
                *(PlannedTensor(f"{name}.{s}", *sizes[s]) for s in self._suffixes())]

    def describe(self) -> str:
        """The quantization in words, for logs and the merge manifest: e.g. "nf4 + double quantization (bitsandbytes,
        block 64)"."""
        return f"{self.quant_type}{' + double quantization' if self.double_quant else ''} (bitsandbytes, block {self.blocksize})"
