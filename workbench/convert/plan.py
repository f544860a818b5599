"""What converting a model to GGUF writes, known before any weight is read: its tensors in file order (GGUF
names and shapes, experts to stack, q/k rows to permute, norm offsets), hyperparameters and vocabulary."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import gguf
import torch

from ..checkpoint import Checkpoint
from ..errors import BadInput
from ..families import check_handled, expert_count
from ..options import TensorTypes
from .gguf_tables import CONVERTIBLE, FLOAT32_ROLES, OUTTYPES, ggml_type, gguf_arch
from .vocab import Vocab, read_vocab


SKIPPED_TENSORS = (".rotary_emb.inv_freq",)
# LongRoPE's names in rope_scaling (Phi-3 128k called it "su")
LONGROPE = ("longrope", "su")
EXPERT_INDEX = re.compile(r"\.experts\.(\d+)\.")
QK_NAMES = {"attn_q": "heads", "attn_k": "kv_heads"}


@dataclass
class Tensor:
    """One tensor of the GGUF to write: where its values come from (an HF tensor, the experts to stack, or
    ``values`` computed by the converter), its GGUF name and shape, and how it is changed before encoding."""
    hf_name: str | None  # None: computed by the converter (``values``) or stacked from ``experts``
    gguf_name: str
    shape: tuple[int, ...]
    permute_heads: int | None = None
    values: torch.Tensor | None = None
    offset: float = 0.0  # added in float32 (Gemma's norms)
    experts: tuple[str, ...] = ()  # a MoE projection's per-expert tensors, stacked in expert order (ffn_*_exps)
    float32: bool = False  # kept F32 whatever the outtype (MoE routers, as llama.cpp's converter keeps them)

    @property
    def read(self) -> bool:
        """True when the values come from the checkpoint (an HF tensor or experts to stack), not from ``values``."""
        return bool(self.hf_name or self.experts)


@dataclass
class Plan:
    """What converting one model writes, whatever the outtype: its tensors in file order, hyperparameters
    and tokenizer, all known before any weight is read."""
    model: Checkpoint
    arch_name: str
    tensors: list[Tensor]
    hparams: dict
    vocab: Vocab
    # write the file even when llama.cpp tokenizes a probe text otherwise than transformers (recorded)
    accept_tokenizer_difference: bool = False

    @property
    def warnings(self) -> list[str]:
        """What the manifest records as warnings: the vocabulary's (a pre-tokenizer llama.cpp does not name)."""
        return self.vocab.warnings


def parse_outtypes(values: list[str]) -> list[str]:
    """The outtypes named in ``values`` (each may hold several, comma-separated), lower-cased, duplicates
    dropped, in order; an unknown name, or none at all, is a BadInput."""
    types = [t.strip().lower() for v in values for t in v.split(",") if t.strip()]
    unknown = [t for t in types if t not in OUTTYPES]
    if unknown or not types:
        raise BadInput(f"unknown outtype {', '.join(unknown) or '(none)'}; known: {', '.join(OUTTYPES)}")
    return list(dict.fromkeys(types))


def plan_conversion(model_dir: Path) -> Plan:
    """The plan for converting ``model_dir`` to GGUF, from its config, safetensors headers and tokenizer
    (no weight is read); an architecture, rope scaling or tokenizer the converter does not handle, or a model
    already quantized, is a BadInput."""
    model = Checkpoint(model_dir)
    config = model.config
    arch_name = (config.get("architectures") or ["?"])[0]
    check_handled(config, f"convert {model_dir} to GGUF")
    if arch_name not in CONVERTIBLE:
        raise BadInput(f"unsupported architecture {arch_name}; supported: {', '.join(CONVERTIBLE)}")
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "?")
        raise BadInput(f"{model_dir} is already quantized ({method}); convert the merged bf16/fp16 model instead "
                       "and pick a GGUF outtype for the quantization")
    arch = CONVERTIBLE[arch_name]
    hparams = _hparams(config)
    vocab = read_vocab(Path(model_dir), hparams["vocab_size"])
    names = gguf.get_tensor_name_map(gguf_arch(arch), hparams["block_count"])
    tensors = []
    if hparams["rope_type"] == "llama3":  # llama.cpp applies Llama 3's frequency scaling from a tensor
        factors = llama3_rope_factors(hparams)
        tensors.append(Tensor(None, gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", tuple(factors.shape), values=factors))
    if hparams["rope_type"] in LONGROPE:
        if not arch.longrope:
            raise BadInput(f"rope scaling {hparams['rope_type']!r} of {arch_name} is not supported by this converter")
        for kind, role in (("long", gguf.MODEL_TENSOR.ROPE_FACTORS_LONG), ("short", gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT)):
            factors = torch.tensor(hparams[f"rope_{kind}_factors"], dtype=torch.float32)
            if factors.numel() != hparams["head_dim"] // 2:
                raise BadInput(f"rope {kind}_factor has {factors.numel()} values; head_dim {hparams['head_dim']} needs {hparams['head_dim'] // 2}")
            tensors.append(Tensor(None, gguf.TENSOR_NAMES[role] + ".weight", tuple(factors.shape), values=factors))
    stacks: dict[str, list[str]] = {}  # llama.cpp's merged expert name -> per-expert names
    for file in model.weight_files:
        for name in model.store.names_in(file):
            if name.endswith(SKIPPED_TENSORS):
                continue
            merged = EXPERT_INDEX.sub(".experts.", name)
            if merged != name:
                if merged not in stacks:
                    stacks[merged] = []
                    tensors.append(Tensor(None, merged, ()))  # named and shaped once its experts are known
                stacks[merged].append(name)
                continue
            gname = names.get_name(name, try_suffixes=(".weight", ".bias"))
            if gname is None:
                raise BadInput(f"no GGUF name for tensor {name} of {arch_name}")
            role = gname.split(".")[2] if gname.startswith("blk.") else None
            permute = hparams["head_count" if QK_NAMES.get(role) == "heads" else "head_count_kv"] \
                if arch.permute_qk and role in QK_NAMES else None
            offset = arch.norm_offset if name.endswith("norm.weight") else 0.0
            tensors.append(Tensor(name, gname, model.store.tensors[name].shape, permute, offset=offset,
                                  float32=role in FLOAT32_ROLES))
    for t in tensors:
        if t.gguf_name in stacks:
            _stack_experts(t, stacks[t.gguf_name], model, names, hparams, arch_name)
    return Plan(model, arch_name, tensors, hparams, vocab)


def _stack_experts(t: Tensor, members: list[str], model: Checkpoint, names, hparams: dict, arch_name: str) -> None:
    """One MoE projection of one layer as llama.cpp's converter writes it: every expert's tensor stacked
    along a new first axis, in expert order."""
    merged = t.gguf_name
    order = sorted(members, key=lambda n: int(EXPERT_INDEX.search(n).group(1)))
    if len(order) != hparams["expert_count"]:
        raise BadInput(f"{merged} has {len(order)} experts in the checkpoint, the config says {hparams['expert_count']}")
    gname = names.get_name(merged, try_suffixes=(".weight", ".bias"))
    if gname is None:
        raise BadInput(f"no GGUF name for the experts {merged} of {arch_name}")
    t.gguf_name, t.experts = gname, tuple(order)
    t.shape = (len(order), *model.store.tensors[order[0]].shape)


def rope_parameters(config: dict) -> tuple[dict, float | None]:
    """The global layers' rope parameters and the sliding-window layers' rope theta (Gemma 3), from either
    layout: transformers 5's rope_parameters (one dict, or one per layer type) or the rope_theta,
    rope_scaling and rope_local_base_freq fields released checkpoints carry."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    local = config.get("rope_local_base_freq")
    if "full_attention" in rope or "sliding_attention" in rope:
        local = rope.get("sliding_attention", {}).get("rope_theta", local)
        rope = rope.get("full_attention", {})
    return rope, local


def _hparams(config: dict) -> dict:
    rope, local_theta = rope_parameters(config)
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type not in ("default", "linear", "yarn", "llama3", *LONGROPE):
        raise BadInput(f"rope scaling {rope_type!r} is not supported by this converter (default, linear, yarn, llama3, "
                       "longrope)")
    return {
        "context_length": config["max_position_embeddings"],
        "embedding_length": config["hidden_size"],
        "feed_forward_length": config["intermediate_size"],
        "block_count": config["num_hidden_layers"],
        "head_count": heads,
        "head_count_kv": config.get("num_key_value_heads") or heads,
        "head_dim": head_dim,
        "rms_eps": config.get("rms_norm_eps", 1e-6),
        "rope_theta": config.get("rope_theta") or rope.get("rope_theta") or 10000.0,
        "rope_theta_swa": local_theta,
        "rope_type": rope_type,
        "rope_factor": rope.get("factor"),
        "rope_original_context": rope.get("original_max_position_embeddings") or config.get("original_max_position_embeddings"),
        "rope_long_factors": rope.get("long_factor"),
        "rope_short_factors": rope.get("short_factor"),
        "rope_low_freq_factor": rope.get("low_freq_factor", 1.0),
        "rope_high_freq_factor": rope.get("high_freq_factor", 4.0),
        "vocab_size": config["vocab_size"],
        "expert_count": expert_count(config) or None,
        "expert_used_count": config.get("num_experts_per_tok"),
        "expert_feed_forward_length": config.get("moe_intermediate_size"),
        "expert_shared_feed_forward_length": config.get("shared_expert_intermediate_size"),
    }


def sliding_layers(config: dict) -> list[bool]:
    """Which layers use the sliding window: config.json's layer_types, else every layer but each
    sliding_window_pattern-th (Gemma 3's released configs and transformers' default: 6)."""
    if config.get("layer_types"):
        return [kind == "sliding_attention" for kind in config["layer_types"]]
    pattern = config.get("sliding_window_pattern", 6)
    return [(i + 1) % pattern != 0 for i in range(config["num_hidden_layers"])]


def llama3_rope_factors(h: dict) -> torch.Tensor:
    """Llama 3's rope frequency divisors per rotary pair, as llama.cpp reads them from ``rope_freqs``: 1 for
    wavelengths under original_context / high_freq_factor, ``factor`` above original_context /
    low_freq_factor, interpolated between; float32 throughout, as llama.cpp's converter computes them."""
    dim, factor = h["head_dim"], float(h["rope_factor"] or 8.0)
    low, high, context = h["rope_low_freq_factor"], h["rope_high_freq_factor"], h["rope_original_context"] or 8192
    freqs = 1.0 / (h["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    wavelen = 2 * math.pi / freqs
    smooth = (context / wavelen - low) / (high - low)
    between = 1 / ((1 - smooth) / factor + smooth)
    return torch.where(wavelen < context / high, torch.ones_like(wavelen),
                       torch.where(wavelen > context / low, torch.full_like(wavelen, factor), between))


def permute_heads(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's rotate-half row order -> GGML's interleaved pairs, per head (rows = heads * head_dim)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def source_data(plan: Plan, t: Tensor) -> torch.Tensor:
    """A tensor as the converter means it, before encoding: read (experts stacked), q/k permuted, offset."""
    data = t.values if not t.read else plan.model.store.get(t.hf_name) if t.hf_name else \
        torch.stack([plan.model.store.get(n) for n in t.experts])
    if t.permute_heads:
        data = permute_heads(data, t.permute_heads)
    if t.offset:  # in float32, as llama.cpp's converter does (bf16 would round 1 + w to 2^-8)
        data = data.float() + t.offset
    return data


# what writer.encode writes itself, by outtype name; other GGML types come from llama.cpp's quantize
DIRECT_TYPES = ("f32", "f16", "bf16", "q8_0")
OUTPUT, TOKEN_EMBEDDING = "output.weight", "token_embd.weight"


def check_tensor_types(plan: Plan, outtypes: list[str], types: TensorTypes) -> None:
    """Refuse before anything is written: a pattern that is no regular expression or names no tensor of the
    model, an unknown type, or a type the workbench cannot write into a file it writes itself (F32/F16/BF16/Q8_0:
    llama.cpp's quantize makes the others)."""
    names = [t.gguf_name for t in plan.tensors]
    chosen = [(f"--tensor-type {p}={t}", t) for p, t in types.patterns]
    chosen += [(f"--{k}-type {t}", t) for k, t in (("output-tensor", types.output), ("token-embedding", types.token_embedding)) if t]
    for what, name in chosen:
        ggml_type(name, what)
        if name not in DIRECT_TYPES and any(OUTTYPES[o].direct for o in outtypes):
            raise BadInput(f"{what}: a {name.upper()} tensor in a {', '.join(OUTTYPES[o].label for o in outtypes if OUTTYPES[o].direct)} "
                           f"file, which the workbench writes itself (F32, F16, BF16, Q8_0); llama.cpp's quantize types "
                           "(q4_k_m, q6_k, ...) take any type")
    for pattern, _ in types.patterns:
        try:
            found = any(re.search(pattern, n) for n in names)
        except re.error as exc:
            raise BadInput(f"--tensor-type {pattern}: not a regular expression ({exc})") from None
        if not found:
            raise BadInput(f"--tensor-type {pattern}: names no tensor of this model (GGUF names, e.g. {names[-1]})")


def tensor_outtype(t: Tensor, outtype: str, types: TensorTypes, has_output: bool) -> str:
    """The type of ``t`` in a file the workbench writes as ``outtype``, chosen as llama.cpp's quantize chooses:
    the output type for output.weight (for token_embd.weight in a model without one), else the token embedding
    type for token_embd.weight, then the first --tensor-type pattern found in the name. MoE routers stay F32."""
    if t.float32:
        return "f32"
    chosen = outtype
    if types.output and (t.gguf_name == OUTPUT or (not has_output and t.gguf_name == TOKEN_EMBEDDING)):
        chosen = types.output
    elif types.token_embedding and t.gguf_name == TOKEN_EMBEDDING:
        chosen = types.token_embedding
    return next((name for pattern, name in types.patterns if re.search(pattern, t.gguf_name)), chosen)
