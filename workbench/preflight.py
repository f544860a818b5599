"""Static tensor-parallel preflight: will this checkpoint load under TP=N? No engine, no GPU.

The rules are vLLM's (SGLang shards the same way): attention heads split evenly, KV heads split or
replicate evenly, and every column-parallel (output split) and row-parallel (input split) layer's
per-rank shape must fit the quantization's group size, the Marlin kernels' thread tiles and FP8 block
sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

from .families import expert_count, expert_intermediate
from .quantkind import Quant, quant_of

# Layers by how TP splits them: column-parallel split their output features, row-parallel their input.
# (name, parallel style, in features, out features) as functions of the config.
ATTENTION = (
    ("q_proj", "column", lambda c: c.hidden, lambda c: c.heads * c.head_dim),
    ("k_proj", "column", lambda c: c.hidden, lambda c: c.kv_heads * c.head_dim),
    ("v_proj", "column", lambda c: c.hidden, lambda c: c.kv_heads * c.head_dim),
    ("o_proj", "row", lambda c: c.heads * c.head_dim, lambda c: c.hidden),
)
DENSE_MLP = (
    ("gate_proj", "column", lambda c: c.hidden, lambda c: c.intermediate),
    ("up_proj", "column", lambda c: c.hidden, lambda c: c.intermediate),
    ("down_proj", "row", lambda c: c.intermediate, lambda c: c.hidden),
)
# vLLM's fused MoE without expert parallelism: every expert's intermediate is split across the ranks
EXPERTS = (
    ("experts.gate_up_proj", "column", lambda c: c.hidden, lambda c: c.expert_intermediate),
    ("experts.down_proj", "row", lambda c: c.expert_intermediate, lambda c: c.hidden),
)
SHARED_EXPERT = (
    ("shared_expert.gate_up_proj", "column", lambda c: c.hidden, lambda c: c.shared_intermediate),
    ("shared_expert.down_proj", "row", lambda c: c.shared_intermediate, lambda c: c.hidden),
)
# config keys for the number of routed experts and their intermediate size, by family


def layers_of(shape: Shape) -> tuple:
    """The Linear layers TP splits in a decoder layer of ``shape``, as (name, "column" or "row", in features, out
    features), the sizes as functions of the shape: attention, then the dense MLP and/or the MoE experts."""
    if not shape.experts:
        return ATTENTION + DENSE_MLP
    return ATTENTION + (DENSE_MLP if shape.dense_layers else ()) + EXPERTS + (SHARED_EXPERT if shape.shared_intermediate else ())


# Marlin (vLLM's GPU kernel for GPTQ/AWQ/wNa16): per-rank output a multiple of min_thread_n, input of min_thread_k.
MARLIN_MIN_THREAD_N = 64
MARLIN_MIN_THREAD_K = 128
# Weight-only integer methods that vLLM runs through Marlin on GPUs.
MARLIN_METHODS = {"gptq", "awq", "gptq_marlin", "awq_marlin", "compressed-tensors-wna16"}


@dataclass(frozen=True)
class Shape:
    """The sizes of a decoder layer that decide how TP splits it, read from config.json (shape_of)."""
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    experts: int = 0  # routed experts (0: a dense model)
    expert_intermediate: int = 0
    shared_intermediate: int = 0
    dense_layers: bool = True  # a MoE model with some dense MLP layers (intermediate_size)


def shape_of(config: dict) -> Shape:
    """The Shape of a model from its config.json contents (a multimodal config's text_config when it has one)."""
    text = config.get("text_config", config)
    heads = int(text["num_attention_heads"])
    hidden = int(text["hidden_size"])
    experts = expert_count(text)
    intermediate = int(text["intermediate_size"])
    # Qwen MoE: dense MLPs in mlp_only_layers and off the decoder_sparse_step; Mixtral: none
    dense = bool(text.get("mlp_only_layers")) or int(text.get("decoder_sparse_step") or 1) > 1 or bool(text.get("first_k_dense_replace"))
    return Shape(
        hidden=hidden,
        heads=heads,
        kv_heads=int(text.get("num_key_value_heads") or heads),
        head_dim=int(text.get("head_dim") or hidden // heads),
        intermediate=intermediate,
        experts=experts,
        expert_intermediate=expert_intermediate(text) if experts else 0,
        shared_intermediate=int(text.get("shared_expert_intermediate_size") or 0) if experts else 0,
        dense_layers=dense,
    )


def check_tp(shape: Shape, quant: Quant, tp: int, marlin: bool = True) -> list[str]:
    """Reasons TP=``tp`` cannot load; empty when it can. ``marlin``: the deploy runs Marlin kernels (GPU)."""
    reasons = []
    if shape.heads % tp:
        reasons.append(f"num_attention_heads {shape.heads} not divisible by tp {tp}")
    if tp >= shape.kv_heads:
        if tp % shape.kv_heads:
            reasons.append(f"tp {tp} not a multiple of num_key_value_heads {shape.kv_heads} (KV heads are replicated)")
    elif shape.kv_heads % tp:
        reasons.append(f"num_key_value_heads {shape.kv_heads} not divisible by tp {tp}")
    if reasons:
        return reasons
    for name, style, in_of, out_of in layers_of(shape):
        n_in, n_out = in_of(shape), out_of(shape)
        if name in ("k_proj", "v_proj") and tp > shape.kv_heads:
            rank_in, rank_out = n_in, shape.head_dim  # one replicated KV head per rank
        elif style == "column":
            if n_out % tp:
                reasons.append(f"{name}: {n_out} output features not divisible by tp {tp}")
                continue
            rank_in, rank_out = n_in, n_out // tp
        else:
            if n_in % tp:
                reasons.append(f"{name}: {n_in} input features not divisible by tp {tp}")
                continue
            rank_in, rank_out = n_in // tp, n_out
        if quant.group_size and style == "row" and rank_in % quant.group_size:
            reasons.append(
                f"{name}: per-rank input {rank_in} not a multiple of group_size {quant.group_size} "
                "(vLLM: 'The input size is not aligned with the quantized weight shape')"
            )
        if marlin and quant.method in MARLIN_METHODS:
            if rank_out % MARLIN_MIN_THREAD_N:
                reasons.append(f"{name}: Marlin needs per-rank output % {MARLIN_MIN_THREAD_N} == 0, got {rank_out}")
            if rank_in % MARLIN_MIN_THREAD_K:
                reasons.append(f"{name}: Marlin needs per-rank input % {MARLIN_MIN_THREAD_K} == 0, got {rank_in}")
        if quant.block:
            reasons += _block_reasons(name, style, rank_in, rank_out, quant.block, tp)
    return reasons


# Shards vLLM checks against FP8 blocks at TP=1 too: every shard of a merged layer but its last (q and k of
# qkv_proj, gate of gate_up_proj), and the fused-MoE experts' gate/up, checked whatever the TP size.
BLOCK_CHECKED_AT_TP1 = {"q_proj", "k_proj", "gate_proj", "experts.gate_up_proj", "shared_expert.gate_up_proj"}


def _block_reasons(name: str, style: str, rank_in: int, rank_out: int, block: tuple[int, int], tp: int) -> list[str]:
    """vLLM's FP8 block rules (validate_fp8_block_shape, and the fused-MoE weights): a split or merged layer's
    per-rank output in whole blocks of block_n, a row-parallel layer's per-rank input in whole blocks of
    block_k once TP splits it. vLLM 0.32 does not always say so: a k_proj of 64 outputs fails loading its
    scales ("start (2) + length (1) exceeds dimension size (2)")."""
    block_n, block_k = block
    reasons = []
    if style == "column" and (tp > 1 or name in BLOCK_CHECKED_AT_TP1) and rank_out % block_n:
        reasons.append(f"{name}: per-rank output {rank_out} not a multiple of FP8 block_n {block_n}")
    if style == "row" and tp > 1 and rank_in % block_k:
        reasons.append(f"{name}: per-rank input {rank_in} not a multiple of FP8 block_k {block_k}")
    return reasons


def check_pp(config: dict, pp: int) -> list[str]:
    """Pipeline stages each take whole decoder layers: at least one layer per stage."""
    if pp == 1:
        return []
    layers = int(config.get("text_config", config)["num_hidden_layers"])
    return [f"num_hidden_layers {layers} is fewer than pp {pp} pipeline stages"] if pp > layers else []


def preflight(config: dict, tps: list[int], marlin: bool = True, pp: int = 1) -> dict[int, list[str]]:
    """{tp: reasons it cannot load} for each TP size at pipeline size ``pp`` (empty list: it loads)."""
    shape, quant = shape_of(config), quant_of(config)
    return {tp: check_tp(shape, quant, tp, marlin) + check_pp(config, pp) for tp in tps}
