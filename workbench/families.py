"""Model kinds the workbench cannot handle, recognised from config.json alone, so every verb refuses them
up front in one line instead of failing inside transformers or writing a file that is silently wrong.

The workbench handles text-only decoder stacks of attention layers (full or sliding window): its layer
runner walks them, FP8 targets their linear projections, the GGUF tables name their tensors.
"""

from __future__ import annotations

from .errors import BadInput

ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention", "chunked_attention"}
# config keys that only a multimodal wrapper has: a language model inside, plus its towers
MULTIMODAL_KEYS = ("vision_config", "audio_config", "speech_config", "vision_tower", "mm_projector_type")
# model types of state-space / recurrent stacks that name no layer_types
# config keys naming how many routed experts a MoE layer has (Qwen MoE, Mixtral, DeepSeek)
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")
RECURRENT_MODEL_TYPES = {"mamba": "Mamba state-space", "mamba2": "Mamba-2 state-space", "rwkv": "RWKV recurrent",
                         "falcon_mamba": "Mamba state-space", "xlstm": "xLSTM recurrent"}


def unhandled_reason(config: dict) -> str | None:
    """Why a model with this config cannot go through the workbench, or None."""
    arch = (config.get("architectures") or [config.get("model_type", "?")])[0]
    towers = [k for k in MULTIMODAL_KEYS if config.get(k)]
    if towers:
        return (f"{arch} is a multimodal model ({', '.join(towers)}): the workbench handles text-only causal language "
                "models; extract the language model first")
    kinds = sorted(set(config.get("layer_types") or []) - ATTENTION_LAYER_TYPES)
    if kinds:
        return (f"{arch} has {', '.join(kinds)} layers (a hybrid of attention and linear-attention/state-space "
                "layers): the layer runner, FP8 targets and GGUF tables know attention layers only")
    if config.get("model_type") in RECURRENT_MODEL_TYPES:
        return f"{arch} is a {RECURRENT_MODEL_TYPES[config['model_type']]} model: the workbench knows attention layers only"
    return None


def check_handled(config: dict, what: str) -> None:
    """Refuse, in one line naming the model kind and what is missing, a model the workbench cannot handle."""
    reason = unhandled_reason(config)
    if reason:
        raise BadInput(f"{what}: not supported: {reason}")


def expert_count(config: dict) -> int:
    """Routed experts per MoE layer; 0 for a dense model."""
    return int(next((config[k] for k in EXPERT_COUNT_KEYS if config.get(k)), 0))


def expert_intermediate(config: dict) -> int:
    """Each routed expert's intermediate size: moe_intermediate_size, else (Mixtral) intermediate_size."""
    return int(config.get("moe_intermediate_size") or config["intermediate_size"])
