"""bitsandbytes 4-bit as a codec of the one-walk quantizer; the tensor layout is workbench/bnb4.py."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..bnb4 import Bnb4bit
from ..checkpoint import PlannedTensor


class Codec:
    """bitsandbytes 4-bit in the one-walk quantizer (quantize/walk.py, its Codec protocol): no calibration;
    the quality report runs each layer with its dequantized weights, which is what bitsandbytes' 4-bit
    Linear computes with (it dequantizes to the compute dtype and runs a dense matmul)."""

    calibrates = False
    writes_experts = False  # a mixture of experts is refused before anything is written
    extra_layer_bytes = 2.5  # the dequantized copy (bf16) and the packed codes, per parameter

    def __init__(self, quant_type: str, double_quant: bool):
        self.bnb = Bnb4bit(quant_type, double_quant)

    def planned(self, name: str, shape: tuple[int, ...]) -> list[PlannedTensor]:
        """The packed codes and quant state bitsandbytes saves for the weight ``name`` (bnb4.py's layout)."""
        return self.bnb.planned(name, shape)

    def quantize(self, name: str, weight: torch.Tensor, amax: float, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """From the weight in the checkpoint's ``dtype``, as transformers quantizes it at load time."""
        return self.bnb.tensors(name, weight.to(dtype))

    @contextlib.contextmanager
    def emulated(self, layer: nn.Module, written: dict[str, torch.Tensor]):
        """A context in which each written Linear of ``layer`` holds its dequantized weight (in the Linear's dtype);
        yields how many were swapped, and puts the original weights back on leaving."""
        originals = {}
        for module_name, dequantized in written.items():
            module = layer.get_submodule(module_name)
            originals[module_name] = module.weight
            module.weight = nn.Parameter(dequantized.to(module.weight.dtype), requires_grad=False)
        try:
            yield len(originals)
        finally:
            for module_name, weight in originals.items():
                layer.get_submodule(module_name).weight = weight

    def quantization_config(self, ignored: list[str], compute_dtype: str) -> dict:
        """config.json's ``quantization_config``, with the keys transformers writes for a 4-bit model."""
        return {
            "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": self.bnb.quant_type, "bnb_4bit_use_double_quant": self.bnb.double_quant,
            "bnb_4bit_compute_dtype": compute_dtype, "bnb_4bit_quant_storage": "uint8",
            "llm_int8_skip_modules": ignored, "llm_int8_threshold": 6.0, "llm_int8_has_fp16_weight": False,
            "llm_int8_enable_fp32_cpu_offload": False, "_load_in_4bit": True, "_load_in_8bit": False,
        }
