"""Block-wise FP8 as DeepSeek-V3 and the Qwen3 FP8 releases ship it, vLLM's "fp8" format with
``weight_block_size``: per target Linear, ``weight`` float8_e4m3fn and ``weight_scale_inv`` float32 of shape
[ceil(out/128), ceil(in/128)], one scale per 128x128 block = the block's amax / 448 (an edge block's from its
real elements only), which multiplies the block back ("inv" is the releases' name, not the operation).
Activations are quantized dynamically at run time, per token and per group of 128 input channels.

Unlike the per-tensor format, nothing is re-quantized at load time: each block keeps its own scale, so a
fused layer (q/k/v, gate/up) is its shards' blocks side by side, provided every shard but the last is a
whole number of blocks (the TP preflight checks that). The quality report emulates what a GPU computes
(FP8 activations per token group times FP8 block weights, accumulated in float32)."""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

from ..checkpoint import PlannedTensor
from .fp8 import FP8, FP8_MAX, EmulatedFP8Linear, Quantized, swapped

BLOCK = (128, 128)  # [out, in], as the releases and vLLM's kernels use
GROUP_SCALE_FLOOR = 1e-10  # vLLM's per-token-group quantization: scale = max(amax, floor) / 448


def scale_shape(shape: tuple[int, ...], block: tuple[int, int] = BLOCK) -> tuple[int, int]:
    """The shape of ``weight_scale_inv`` for a weight of ``shape`` [out, in]: one scale per block, edge blocks
    included."""
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


def _blocks(w: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """``w`` [out, in] zero-padded to whole blocks, as [out blocks, block_out, in blocks, block_in]."""
    rows, cols = scale_shape(tuple(w.shape), block)
    padded = torch.nn.functional.pad(w, (0, cols * block[1] - w.shape[1], 0, rows * block[0] - w.shape[0]))
    return padded.reshape(rows, block[0], cols, block[1])


def quantize_weight(weight: torch.Tensor, block: tuple[int, int] = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, float32 weight_scale_inv [out blocks, in blocks]); zero padding never raises a
    block's amax, so an edge block's scale is its real elements'."""
    blocks = _blocks(weight.float(), block)
    scale = (blocks.abs().amax(dim=(1, 3)) / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    q = (blocks / scale[:, None, :, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    out, cols = weight.shape
    return q.reshape(q.shape[0] * block[0], -1)[:out, :cols].contiguous(), scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] = BLOCK) -> torch.Tensor:
    """The float32 weight [out, in] that ``q`` and its block scales ``scale`` stand for: each block times its scale."""
    blocks = _blocks(q.float(), block) * scale[:, None, :, None]
    return blocks.reshape(blocks.shape[0] * block[0], -1)[:q.shape[0], :q.shape[1]]


def quantize_activation(x: torch.Tensor, group: int = BLOCK[1]) -> torch.Tensor:
    """``x`` [..., in] through FP8 per token and group of ``group`` input channels, back in float32."""
    width = x.shape[-1]
    padded = torch.nn.functional.pad(x.float(), (0, -width % group))
    groups = padded.reshape(*padded.shape[:-1], -1, group)
    scale = groups.abs().amax(dim=-1, keepdim=True).clamp_min(GROUP_SCALE_FLOOR) / FP8_MAX
    dq = (groups / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8).float() * scale
    return dq.reshape(padded.shape)[..., :width]


class EmulatedBlockFP8Linear(EmulatedFP8Linear):
    """What a GPU computes for one block-FP8 layer: FP8 activations per token group times FP8 block weights,
    in float32."""

    scales_per_tensor = False  # a scale per block: the product is taken on dequantized values

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` through FP8 per token and group of 128 input channels, back in float32."""
        return quantize_activation(x)

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight: each 128x128 block of the fp8 weight times its scale."""
        return dequantize_weight(self.weight_fp8, self.scale)


class Codec:
    """Block-wise FP8 in the one-walk quantizer (quantize/walk.py, its Codec protocol)."""

    extra_layer_bytes = 1  # the layer's fp8 copy, per parameter
    calibrates = False  # activations are scaled at run time
    writes_experts = True  # per expert, each with its own blocks

    def planned(self, name: str, shape: tuple[int, ...]) -> list[PlannedTensor]:
        """The fp8 weight and its float32 weight_scale_inv, one scale per 128x128 block."""
        scales = PlannedTensor(name.removesuffix(".weight") + ".weight_scale_inv", torch.float32, scale_shape(shape))
        return [PlannedTensor(name, FP8, shape), scales]

    def quantize(self, name: str, weight: torch.Tensor, amax: float, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], Quantized]:
        """The tensors ``planned`` lists for ``name`` and the Quantized record the emulation takes; ``amax`` is unused
        (activations are scaled at run time)."""
        q, scale = quantize_weight(weight)
        return {name: q, name.removesuffix(".weight") + ".weight_scale_inv": scale}, Quantized(q, scale, None)

    def emulated(self, layer: nn.Module, written: dict[str, Quantized]):
        """A context in which each written Linear of ``layer`` is an EmulatedBlockFP8Linear (nothing re-quantized)."""
        return swapped(layer, {name: partial(EmulatedBlockFP8Linear, q.weight, q.scale) for name, q in written.items()})

    def quantization_config(self, ignored: list[str], compute_dtype: str) -> dict:
        """As the DeepSeek-V3 and Qwen3 FP8 releases carry it, with the unquantized Linear layers under the
        name both vLLM and transformers read (vLLM would otherwise build a Qwen3-MoE router in FP8)."""
        return {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": list(BLOCK),
                "modules_to_not_convert": ignored}
