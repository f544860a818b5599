"""What the workbench knows of each model family, as one record per architecture, and the model kinds it
cannot handle, recognised from config.json alone so every verb refuses them up front in one line instead of
failing inside transformers or writing a file that is silently wrong.

The workbench handles text-only decoder stacks of attention layers (full or sliding window): its layer
runner walks them, FP8 targets their linear projections, the GGUF converter names their tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import BadInput


@dataclass(frozen=True)
class ExpertLayout:
    """How a family's checkpoint names a MoE block and its experts' projections."""

    gate: str
    up: str
    down: str
    block: str = "mlp"  # the MoE block's module name in the checkpoint (transformers 5 calls it "mlp")


@dataclass(frozen=True)
class GgufLayout:
    """How llama.cpp names and reads a family."""

    arch: str  # gguf-py's MODEL_ARCH member: the tensor map and the writer's architecture
    # Llama-family checkpoints store Q/K rows in HF's rotate-half order; GGML's rope wants them interleaved.
    permute_qk: bool
    # added to every norm weight: Gemma stores w and multiplies by (1 + w), llama.cpp by the weight itself
    norm_offset: float = 0.0
    # config fields (top level, else in the rope parameters) written as GGUF keys: (field, gguf-py writer
    # method); a field set to null is written as 0 (Phi-3: no sliding window)
    extra_keys: tuple[tuple[str, str], ...] = ()
    # which layers slide written per layer (llama.cpp otherwise assumes its own fixed pattern for the arch)
    swa_layers: bool = False
    # LongRoPE (Phi-3 128k, Phi-3.5): llama.cpp reads the per-dimension factors from two tensors
    longrope: bool = False


@dataclass(frozen=True)
class Family:
    """One architecture: the names the layer runner, the merge and the GGUF converter look up."""

    architecture: str  # config.json's architectures[0]
    model_type: str
    final_norm: str = "norm"  # the decoder's last norm, an attribute of the base model
    input_embedding: str = "model.embed_tokens.weight"  # the checkpoint tensor lm_head is tied to
    experts: ExpertLayout | None = None  # MoE families
    gguf: GgufLayout | None = None  # families the GGUF converter writes


SWIGLU = ExpertLayout("gate_proj", "up_proj", "down_proj")
LLAMA_GGUF = GgufLayout("LLAMA", permute_qk=True)
GEMMA2_KEYS = (("attn_logit_softcapping", "add_attn_logit_softcapping"),
               ("final_logit_softcapping", "add_final_logit_softcapping"), ("sliding_window", "add_sliding_window"))
FAMILIES: dict[str, Family] = {f.architecture: f for f in (
    Family("LlamaForCausalLM", "llama", gguf=LLAMA_GGUF),
    Family("MistralForCausalLM", "mistral", gguf=LLAMA_GGUF),
    Family("Qwen2ForCausalLM", "qwen2", gguf=GgufLayout("QWEN2", permute_qk=False)),
    Family("Qwen3ForCausalLM", "qwen3", gguf=GgufLayout("QWEN3", permute_qk=False)),
    # GGUF: experts stacked per layer into ffn_{gate,up,down}_exps, the router as ffn_gate_inp
    Family("Qwen3MoeForCausalLM", "qwen3_moe", experts=SWIGLU, gguf=GgufLayout("QWEN3MOE", permute_qk=False)),
    Family("Qwen2MoeForCausalLM", "qwen2_moe", experts=SWIGLU),
    Family("OlmoeForCausalLM", "olmoe", experts=SWIGLU),
    Family("MixtralForCausalLM", "mixtral", experts=ExpertLayout("w1", "w3", "w2", block="block_sparse_moe"), gguf=LLAMA_GGUF),
    Family("Gemma2ForCausalLM", "gemma2", gguf=GgufLayout("GEMMA2", permute_qk=False, norm_offset=1.0, extra_keys=GEMMA2_KEYS)),
    # no softcapping; q/k norms offset like the others; the local rope theta as rope_freq_base_swa
    Family("Gemma3ForCausalLM", "gemma3_text", gguf=GgufLayout(
        "GEMMA3", permute_qk=False, norm_offset=1.0, extra_keys=(("sliding_window", "add_sliding_window"),), swa_layers=True)),
    # fused qkv_proj and gate_up_proj are llama.cpp's attn_qkv and ffn_up as they are
    Family("Phi3ForCausalLM", "phi3", gguf=GgufLayout("PHI3", permute_qk=False, longrope=True, extra_keys=(
        ("original_max_position_embeddings", "add_rope_scaling_orig_ctx_len"), ("sliding_window", "add_sliding_window")))),
    # merged and walked, not converted
    Family("PhiForCausalLM", "phi", final_norm="final_layernorm"),
    Family("GPT2LMHeadModel", "gpt2", final_norm="ln_f", input_embedding="transformer.wte.weight"),
    Family("GPTNeoXForCausalLM", "gpt_neox", final_norm="final_layer_norm", input_embedding="gpt_neox.embed_in.weight"),
)}
BY_MODEL_TYPE = {f.model_type: f for f in FAMILIES.values()}


def family_of(config) -> Family:
    """The record of a config (config.json as a dict, or transformers' config object): by architecture, else
    by model type; a family the table does not name gets the Llama-style names and no experts or GGUF."""
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    architecture, model_type = (get("architectures") or ["?"])[0], get("model_type") or "?"
    return FAMILIES.get(architecture) or BY_MODEL_TYPE.get(model_type) or Family(architecture, model_type)

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
