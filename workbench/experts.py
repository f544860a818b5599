"""MoE experts as checkpoints store them and engines load them: one Linear per expert and projection.

transformers 5 builds a MoE layer's experts as two stacked 3-D parameters (``gate_up_proj`` [E, 2I, H],
gate rows first, and ``down_proj`` [E, H, I]) and converts the checkpoint's per-expert tensors at load
time; checkpoints, and vLLM's loader, hold one 2-D tensor per expert and projection. The layer runner
swaps each stacked module for ``ExpertLinears``, whose Linears carry the checkpoint's names, so a layer
loads from the checkpoint by name, FP8 calibrates and quantizes every expert as vLLM reads it, and the
FP8 emulation swaps an expert's Linears like any other. The routing (which experts, with which weights)
stays transformers' own: only the experts' matmuls are done here, in the same order and dtype.
"""

from __future__ import annotations

import re
import torch
from torch import nn

from .errors import BadInput
from .families import FAMILIES, ExpertLayout, Family


# The router's Linear (and Qwen2-MoE's shared-expert gate) inside a MoE block: never quantized; vLLM builds
# Qwen3-MoE's router with the model's quant_config, so an FP8 checkpoint must list it in ignored_layers.
ROUTERS = ("gate", "shared_expert_gate")
EXPERT_NAME = re.compile(r"^(?P<block>.+)\.experts\.(?P<index>\d+)\.(?P<proj>[^.]+)$")


class Expert(nn.Module):
    """One expert of a MoE layer as checkpoints store it: gate, up and down Linears under the layout's names
    (created on meta), computing down(act(gate(x)) * up(x))."""
    def __init__(self, layout: ExpertLayout, hidden: int, intermediate: int, act, dtype: torch.dtype):
        super().__init__()
        for name, shape in ((layout.gate, (intermediate, hidden)), (layout.up, (intermediate, hidden)),
                            (layout.down, (hidden, intermediate))):
            self.add_module(name, nn.Linear(shape[1], shape[0], bias=False, device="meta", dtype=dtype))
        self.layout, self.act_fn = layout, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """down(act(gate(x)) * up(x)) with the expert's own Linears, in their dtype."""
        gate, up, down = (getattr(self, n) for n in (self.layout.gate, self.layout.up, self.layout.down))
        return down(self.act_fn(gate(x)) * up(x))


class ExpertLinears(nn.ModuleList):
    """Stands in for transformers' stacked experts module: same call (hidden states [tokens, hidden], the
    top-k expert ids and weights per token), same result. Expert ``e`` is item ``e``, as in checkpoints."""

    def __init__(self, stacked: nn.Module, layout: ExpertLayout):
        experts, double_inter, hidden = stacked.gate_up_proj.shape
        dtype = stacked.gate_up_proj.dtype
        super().__init__(Expert(layout, hidden, double_inter // 2, stacked.act_fn, dtype) for _ in range(experts))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """Each token's routed experts' outputs, scaled by their routing weights and summed into a tensor shaped
        and typed as ``hidden_states``; only experts some token was routed to run."""
        out = torch.zeros_like(hidden_states)
        for e in top_k_index.unique().tolist():
            tokens, slot = torch.where(top_k_index == e)
            y = self[e](hidden_states[tokens]) * top_k_weights[tokens, slot, None]
            out.index_add_(0, tokens, y.to(out.dtype))
        return out


def unstack_experts(model: nn.Module, family: Family) -> int:
    """Swap every stacked experts module of ``model`` (on meta) for ExpertLinears; returns how many. A
    layout other than transformers' default (transposed, interleaved, with biases) is refused."""
    swapped = 0
    for name, module in list(model.named_modules()):
        if not isinstance(getattr(module, "gate_up_proj", None), nn.Parameter):
            continue
        layout = family.experts
        odd = [k for k in ("is_transposed", "has_bias") if getattr(module, k, False)] + \
              ([] if getattr(module, "is_concatenated", True) else ["interleaved"])
        if layout is None or odd or module.gate_up_proj.dim() != 3:
            what = f"its {', '.join(odd)} expert weights" if odd else f"no expert layout for {family.model_type!r}"
            known = [f.model_type for f in FAMILIES.values() if f.experts]
            raise BadInput(f"MoE experts of {type(module).__name__} are not supported: {what} (known: {', '.join(known)})")
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, ExpertLinears(module, layout))
        swapped += 1
    return swapped


def renamer(layout: ExpertLayout | None, to_checkpoint: bool):
    """A function turning transformers' module names into the checkpoint's (or back): Mixtral's checkpoints
    call the MoE block ``block_sparse_moe``, transformers 5 ``mlp``."""
    if layout is None or layout.block == "mlp":
        return lambda name: name
    old, new = ("mlp", layout.block) if to_checkpoint else (layout.block, "mlp")
    pattern = re.compile(rf"(\.layers\.\d+)\.{old}\.")
    return lambda name: pattern.sub(rf"\1.{new}.", name, count=1)


def expert_group(name: str) -> str | None:
    """The MoE layer an expert projection belongs to, with the projection (``...mlp.experts.*.down_proj``):
    vLLM gives all experts of a layer one input scale per projection (their max). None for other names."""
    found = EXPERT_NAME.match(name)
    return f"{found['block']}.experts.*.{found['proj']}" if found else None


def routers(model: nn.Module) -> list[str]:
    """The module names of the routers of every MoE block (those holding ExpertLinears)."""
    return [f"{name}.{leaf}" for name, module in model.named_modules()
            if isinstance(getattr(module, "experts", None), ExpertLinears)
            for leaf in ROUTERS if isinstance(getattr(module, leaf, None), nn.Module)]
