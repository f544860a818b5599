"""FP8 in vLLM's "fp8" checkpoint format (the seed's), our own code: llm-compressor writes the
compressed-tensors variant instead. Per target Linear: ``weight`` float8_e4m3fn, ``weight_scale`` float32
scalar = amax|W| / 448, and for static activations ``input_scale`` float32 scalar = amax of the layer's
input over the calibration set / 448.

The format does not load correctly in transformers on CPU, so quality is measured on an emulation with
vLLM's load-time semantics: the shards of a fused layer (q/k/v, gate/up, an expert's w1/w3) are
re-quantized to the largest weight_scale of the group and share the largest input_scale; all experts of a
MoE layer share one input scale per projection, their largest (vLLM's fused-MoE kernels take one). Calibration, writing and the emulated
quality report happen in one walk through the layer runner (quantize/walk.py).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator

import torch
from torch import nn

from ..checkpoint import PlannedTensor
from ..errors import BadInput
from ..experts import expert_group

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
# Modules vLLM fuses into one layer (their scales are merged at load time).
FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj",
         "w1": "w13", "w3": "w13"}


def linear_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear of ``model``, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def stacked_experts(model: nn.Module) -> list[str]:
    """Parameters holding all experts of a MoE layer in one 3-D tensor (transformers 5's fused experts)."""
    return [name for name, p in model.named_parameters() if p.dim() == 3]


def fused_group(name: str) -> str:
    """The layer vLLM fuses ``name`` into (``...q_proj`` -> ``...qkv_proj``), or ``name`` itself when not fused."""
    parent, _, leaf = name.rpartition(".")
    return f"{parent}.{FUSED[leaf]}" if leaf in FUSED else name


def input_group(name: str) -> str:
    """The layers that share ``name``'s input scale in vLLM: its fused layer, across all experts in MoE."""
    fused = fused_group(name)
    return expert_group(fused) or fused


def fill_unrouted(amax: dict[str, float]) -> int:
    """Give experts that no calibration token reached their layer's input amax (vLLM takes the max over
    the experts anyway); returns how many."""
    group_max: dict[str, float] = {}
    for name, value in amax.items():
        group_max[input_group(name)] = max(group_max.get(input_group(name), 0.0), value)
    unrouted = [n for n, v in amax.items() if v == 0.0 and expert_group(n)]
    for n in unrouted:
        amax[n] = group_max[input_group(n)]
    return len(unrouted)


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


@contextlib.contextmanager
def input_amax(module: nn.Module, targets: list[str]) -> Iterator[dict[str, float]]:
    """While open, the running amax of each target submodule's input (its calibration statistic)."""
    amax = dict.fromkeys(targets, 0.0)

    def hook(name):
        def record(_module, args):
            amax[name] = max(amax[name], float(args[0].abs().amax()))
        return record

    handles = [module.get_submodule(n).register_forward_pre_hook(hook(n)) for n in targets]
    try:
        yield amax
    finally:
        for h in handles:
            h.remove()


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, float32 scalar scale) with per-tensor scale amax / 448."""
    w = weight.float()
    scale = (w.abs().amax() / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    return (w / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8), scale.reshape(())


def input_scale(amax: float) -> torch.Tensor:
    """The static input scale for an input amax: a float32 scalar amax / 448 (the amax at least 1e-12)."""
    return torch.tensor(max(amax, 1e-12) / FP8_MAX, dtype=torch.float32)


class EmulatedFP8Linear(nn.Module):
    """What vLLM computes for one FP8 layer: fp8 activations (static scale, or dynamic per-tensor) times
    fp8 weights, accumulated in float32, rescaled.

    For a bfloat16 input the product runs in bfloat16 on the fp8 codes themselves, which bfloat16 holds exactly
    (3 mantissa bits of 7), with both scales applied to the float32 result: the same products and sums as
    float32, at bfloat16's matmul speed (5x float32's on this AMX CPU), except that the sum is rounded to
    bfloat16 once before the scales (a GPU's FP8 GEMM rounds once, after them: at most one bfloat16 unit in the
    last place apart). The codes are held as bfloat16, 2 bytes per parameter, as the source layer was. Other
    inputs compute in float32 from the fp8 weight (1 byte per parameter), dequantized per call (float16 could
    overflow on the unscaled sums)."""

    scales_per_tensor = True  # one scale each for input and weight: they can be applied to the product

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None, act_scale: torch.Tensor | None = None):
        super().__init__()
        self.weight_fp8, self.scale = weight, scale  # after vLLM's fused re-quantization
        self.bias = bias
        self.act_scale = act_scale
        self._codes_bf16: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T (+ bias) with the input and weight as FP8 holds them, accumulated in float32, in ``x``'s dtype."""
        if x.dtype == torch.bfloat16 and self.scales_per_tensor:
            if self._codes_bf16 is None:
                self._codes_bf16 = self.weight_fp8.to(torch.bfloat16)
            codes, act_scale = self._input_codes(x.float())
            y = (codes.to(torch.bfloat16) @ self._codes_bf16.T).float().mul_(act_scale * self.scale)
        else:
            y = self.quantized_input(x.float()) @ self.dequantized_weight().T
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)

    def _input_codes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the FP8 codes of float32 ``x``, its scale): the static input scale, or else its own amax / 448."""
        scale = self.act_scale if self.act_scale is not None else (x.abs().amax() / FP8_MAX).clamp_min(1e-12)
        return (x / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8), scale

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` through FP8 and back to float32: per tensor, with the static input scale or else its own amax / 448."""
        codes, scale = self._input_codes(x)
        return codes.float() * scale

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight the fp8 weight and its per-tensor scale stand for."""
        return self.weight_fp8.float().mul_(self.scale)  # in place: one float32 copy of the weight, not two


@dataclass
class Quantized:
    """One layer as written: fp8 weight, weight scale, static input scale (None: dynamic)."""

    weight: torch.Tensor
    scale: torch.Tensor
    input_scale: torch.Tensor | None


class Codec:
    """vLLM's fp8 format in the one-walk quantizer (quantize/walk.py, its Codec protocol)."""

    extra_layer_bytes = 1  # the layer's fp8 copy, per parameter
    calibrates: bool  # static activation scales only
    writes_experts = True  # per expert, as vLLM's fused-MoE loader reads them

    def __init__(self, scheme: str):
        self.scheme = scheme
        self.calibrates = scheme == "static"

    def planned(self, name: str, shape: tuple[int, ...]) -> list[PlannedTensor]:
        """The fp8 weight and its float32 scalar weight_scale, and input_scale when activations are static."""
        module = name.removesuffix(".weight")
        scales = ["weight_scale", "input_scale"] if self.calibrates else ["weight_scale"]
        return [PlannedTensor(name, FP8, shape), *(PlannedTensor(f"{module}.{s}", torch.float32, ()) for s in scales)]

    def quantize(self, name: str, weight: torch.Tensor, amax: float, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], "Quantized"]:
        """The tensors ``planned`` lists for ``name``, from the weight and (static scheme) its input ``amax``, and
        the Quantized record the emulation takes."""
        q, scale = quantize_weight(weight)  # the compute-dtype weight holds the checkpoint's values exactly
        act = input_scale(amax) if self.calibrates else None
        module = name.removesuffix(".weight")
        tensors = {name: q, f"{module}.weight_scale": scale, **({f"{module}.input_scale": act} if act is not None else {})}
        return tensors, Quantized(q, scale, act)

    def emulated(self, layer: nn.Module, written: dict[str, "Quantized"]):
        """The module-level ``emulated``: the written layers as vLLM computes them, fused scales merged."""
        return emulated(layer, written)

    def quantization_config(self, ignored: list[str], compute_dtype: str) -> dict:
        """vLLM's fp8 config: the activation scheme (static or dynamic) and the unquantized layers as ignored_layers."""
        return {"quant_method": "fp8", "activation_scheme": self.scheme, "ignored_layers": ignored}


@contextlib.contextmanager
def emulated(module: nn.Module, written: dict[str, Quantized]):
    """While open, the written FP8 layers of ``module`` (by submodule name) are swapped for their vLLM
    emulation, with vLLM's load-time semantics: the shards of a fused layer are re-quantized to the
    group's largest weight scale; input scales are shared as ``input_group`` says. The replaced layers' own weights are
    dropped (the caller's runner reloads them); the layers are put back on exit."""
    groups: dict[str, list[str]] = {}
    acts: dict[str, torch.Tensor] = {}
    for n, q in written.items():
        groups.setdefault(fused_group(n), []).append(n)
        if q.input_scale is not None:
            acts[input_group(n)] = torch.maximum(acts.get(input_group(n), q.input_scale.float()), q.input_scale.float())
    builders = {}
    for members in groups.values():
        max_scale = max(written[n].scale.float() for n in members)
        act = acts.get(input_group(members[0]))
        for n in members:
            dq = written[n].weight.float().mul_(written[n].scale.float())
            requantized = dq.div_(max_scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
            builders[n] = partial(EmulatedFP8Linear, requantized, max_scale, act_scale=act)
    with swapped(module, builders) as count:
        yield count


@contextlib.contextmanager
def swapped(module: nn.Module, builders: dict[str, Callable[..., nn.Module]]):
    """While open, each Linear of ``module`` named in ``builders`` is replaced by ``builders[name](bias=its bias)``;
    its own weights are dropped (the caller's runner reloads them), and it is put back on exit."""
    from ..runner import LayerRunner

    replaced = []
    for name, build in builders.items():
        parent, _, leaf = name.rpartition(".")
        owner = module.get_submodule(parent) if parent else module
        original = getattr(owner, leaf)
        bias = original.bias.detach().clone() if original.bias is not None else None
        LayerRunner.unload(original)
        setattr(owner, leaf, build(bias=bias))
        replaced.append((owner, leaf, original))
    try:
        yield len(replaced)
    finally:
        for owner, leaf, original in replaced:
            setattr(owner, leaf, original)
