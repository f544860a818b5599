"""FP8 in vLLM's "fp8" checkpoint format (the seed's), our own code: llm-compressor writes the
compressed-tensors variant instead. Per target Linear: ``weight`` float8_e4m3fn, ``weight_scale`` float32
scalar = amax|W| / 448, and for static activations ``input_scale`` float32 scalar = amax of the layer's
input over the calibration set / 448.

The format does not load correctly in transformers on CPU, so quality is measured on an emulation with
vLLM's load-time semantics: the shards of a fused layer (q/k/v, gate/up) are re-quantized to the largest
weight_scale of the group and share the largest input_scale.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..errors import BadInput

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
# Modules vLLM fuses into one layer (their scales are merged at load time).
FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}


def linear_modules(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def fused_group(name: str) -> str:
    parent, _, leaf = name.rpartition(".")
    return f"{parent}.{FUSED[leaf]}" if leaf in FUSED else name


def resolve_targets(names: list[str], ignore: list[str]) -> tuple[list[str], list[str], list[str]]:
    """(targets, ignored full names, warnings). An ignore entry matches a module name exactly or as a dotted
    prefix, as vLLM matches ignored_layers; a fused layer must be ignored as a whole."""
    def matches(entry: str, name: str) -> bool:
        return name == entry or name.startswith(entry + ".")

    ignored = [n for n in names if any(matches(e, n) for e in ignore)]
    warnings = [f"ignore pattern {e!r} matches no Linear layer" for e in ignore if not any(matches(e, n) for n in names)]
    groups: dict[str, set[bool]] = {}
    for n in names:
        groups.setdefault(fused_group(n), set()).add(n in ignored)
    split = [g for g, states in groups.items() if len(states) > 1]
    if split:
        raise BadInput(f"ignore list splits the fused layer {split[0]}: vLLM needs all of its shards quantized or all ignored")
    return [n for n in names if n not in ignored], ignored, warnings


@torch.inference_mode()
def calibrate(model: nn.Module, targets: list[str], samples: torch.Tensor, batch: int = 8,
              on_samples: Callable[[int, int], None] | None = None) -> dict[str, float]:
    """amax of each target layer's input over the calibration samples (``on_samples(done, total)`` after each batch)."""
    amax = dict.fromkeys(targets, 0.0)
    modules = dict(model.named_modules())

    def hook(name):
        def record(_module, args):
            amax[name] = max(amax[name], float(args[0].abs().amax()))
        return record

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in targets]
    try:
        for i, chunk in enumerate(samples.split(batch)):
            model(input_ids=chunk)
            if on_samples:
                on_samples(min((i + 1) * batch, len(samples)), len(samples))
    finally:
        for h in handles:
            h.remove()
    return amax


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, float32 scalar scale) with per-tensor scale amax / 448."""
    w = weight.float()
    scale = (w.abs().amax() / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale.reshape(())


def input_scale(amax: float) -> torch.Tensor:
    return torch.tensor(max(amax, 1e-12) / FP8_MAX, dtype=torch.float32)


class EmulatedFP8Linear(nn.Module):
    """What vLLM computes for one FP8 layer: fp8 activations (static scale, or dynamic per-tensor) times
    fp8 weights, accumulated in float32, rescaled."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, act_scale: torch.Tensor | None):
        super().__init__()
        self.weight_eff = weight  # dequantized float32 weight after vLLM's fused re-quantization
        self.bias = bias
        self.act_scale = act_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        scale = self.act_scale if self.act_scale is not None else (xf.abs().amax() / FP8_MAX).clamp_min(1e-12)
        xq = (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).float() * scale
        y = xq @ self.weight_eff.T
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)


def emulate(model: nn.Module, read) -> int:
    """Swap every FP8 layer of ``model`` (whose tensors ``read(name)`` returns from the written artifact, or
    None when absent) for its vLLM emulation; returns the number of layers swapped."""
    modules = linear_modules(model)
    layers = {n: m for n, m in modules.items() if read(n + ".weight_scale") is not None}
    groups: dict[str, list[str]] = {}
    for n in layers:
        groups.setdefault(fused_group(n), []).append(n)
    for members in groups.values():
        scales = {n: read(n + ".weight_scale").float() for n in members}
        max_scale = max(scales.values())
        inputs = [read(n + ".input_scale") for n in members]
        act = max(s.float() for s in inputs) if inputs[0] is not None else None
        for n in members:
            dq = read(n + ".weight").float() * scales[n]
            # vLLM re-quantizes each shard to the group's largest scale
            w_eff = (dq / max_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).float() * max_scale
            parent, _, leaf = n.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            setattr(owner, leaf, EmulatedFP8Linear(w_eff, layers[n].bias, act))
    return len(layers)
