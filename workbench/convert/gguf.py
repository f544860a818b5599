"""`workbench convert gguf`: a Hugging Face checkpoint to GGUF for llama.cpp, streamed.

Direct types (F32/F16/BF16/Q8_0) are written here with gguf-py's writer, one tensor at a time: every
tensor's info is declared from the safetensors headers first, then each tensor is read, converted and
written. K-quants and the other llama.cpp types are made from the F16 result by llama.cpp's own quantize
(llama-cpp-python's ``llama_model_quantize``), run in the llama.cpp engine's environment.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import subprocess
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
import torch

from ..checkpoint import Checkpoint, FollowingHasher, sha256_file
from ..engines import ENGINES, check_installed, cpu_threads, engine_python, usable_cpus
from ..errors import ArtifactFailed, BadInput, EnvironmentProblem
from ..families import check_handled, expert_count
from ..guard import set_parent_death_signal
from ..hf import adds_bos, quiet_transformers
from ..hub import output_stem
from ..manifest import folder_digest, now, tool_versions, write_file_manifest
from ..prompts import probe_texts
from ..safety import remote_code_trusted
from ..options import Calibration
from ..outputs import atomic_output_file
from .gguf_tables import (CONVERTIBLE, DEFAULT_PRE_TOKENIZER, FLOAT32_ROLES, GPT2_PATTERN, OUTTYPES, PRE_TOKENIZERS, SPECIAL_PROBES,
                          TOKENIZER_PROBES, gguf_arch)
from .gguf_readback import GgufReadBackError, read_back_gguf
from .imatrix import importance_matrix

SKIPPED_TENSORS = (".rotary_emb.inv_freq",)
# LongRoPE's names in rope_scaling (Phi-3 128k called it "su")
LONGROPE = ("longrope", "su")
EXPERT_INDEX = re.compile(r"\.experts\.(\d+)\.")
QUANT_CHUNK_ELEMENTS = 1 << 20
_QUANT_POOL = ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1)))
QK_NAMES = {"attn_q": "heads", "attn_k": "kv_heads"}
# llama.cpp's quantize through llama-cpp-python's C API. With an importance matrix (argv[5]: JSON with the
# .npz of per-tensor values and the metadata llama-quantize records): a NULL-terminated
# llama_model_imatrix_data array, and the quantize.imatrix.* keys as kv overrides.
QUANTIZE_SCRIPT = """
import ctypes, json, sys
import llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype, params.nthread = int(sys.argv[3]), int(sys.argv[4])
imatrix = json.loads(sys.argv[5])
if imatrix:
    import numpy as np
    values = np.load(imatrix["path"])
    arrays = {n: np.ascontiguousarray(values[n], dtype=np.float32) for n in values.files}
    entries = (llama_cpp.llama_model_imatrix_data * (len(arrays) + 1))()
    for entry, (name, data) in zip(entries, arrays.items()):
        entry.name, entry.size = name.encode(), data.size
        entry.data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    keys = [("quantize.imatrix.file", imatrix["file"]), ("quantize.imatrix.dataset", imatrix["dataset"]),
            ("quantize.imatrix.entries_count", len(arrays)), ("quantize.imatrix.chunks_count", imatrix["chunks"])]
    overrides = (llama_cpp.llama_model_kv_override * (len(keys) + 1))()
    for o, (key, value) in zip(overrides, keys):
        o.key = key.encode()
        if isinstance(value, int):
            o.tag, o.value.val_i64 = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT, value
        else:
            o.tag, o.value.val_str = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR, value.encode()[:127]
    params.kv_overrides = ctypes.cast(overrides, ctypes.POINTER(llama_cpp.llama_model_kv_override))
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), params))
"""


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
    vocab = _vocab(Path(model_dir), hparams["vocab_size"])
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


def _rope_parameters(config: dict) -> tuple[dict, float | None]:
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
    rope, local_theta = _rope_parameters(config)
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


def _sliding_layers(config: dict) -> list[bool]:
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


@dataclass
class Vocab:
    """The tokenizer as llama.cpp reads it."""
    model: str  # llama.cpp's tokenizer model: "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    tokens: list[str]
    types: list[int]
    pre: str  # llama.cpp's pre-tokenizer name
    add_bos: bool
    proven: bool  # False: kept only if llama.cpp tokenizes the probe texts as transformers (prove_tokenizer)
    scores: list[float] | None = None  # SentencePiece's piece scores (its merge order)
    space_prefix: bool = False  # SentencePiece: text starts with "▁" (a dummy prefix)
    warnings: list[str] = field(default_factory=list)


def _vocab(model_dir: Path, vocab_size: int) -> Vocab:
    """The tokenizer as transformers loads it (what vLLM and the reference use too): byte-level BPE from its
    tokenizer.json, SentencePiece from tokenizer.model plus the tokens transformers adds. Some tokenizer
    classes rebuild the tokenizer.json pipeline (transformers' Qwen2 class imposes its split regex and drops BOS)."""
    if not (model_dir / "tokenizer.json").is_file():
        raise BadInput(f"tokenizer missing: {model_dir / 'tokenizer.json'} (GGUF embeds the tokenizer; save it beside the model)")
    from transformers import AutoTokenizer

    quiet_transformers()
    try:
        hf = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=remote_code_trusted())
        tok = json.loads(hf.backend_tokenizer.to_str())
    except Exception as exc:  # any loader failure is a bad tokenizer folder
        raise BadInput(f"tokenizer cannot be loaded from {model_dir}: {exc}") from None
    model = tok.get("model") or {}
    pre = tok.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre else []
    byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
    if model.get("type") != "BPE":
        raise BadInput(f"tokenizer kind not supported (model {model.get('type')}): BPE tokenizers only")
    add_bos = adds_bos(hf)
    if byte_level:
        vocab = _byte_level_vocab(tok, steps, byte_level[0], vocab_size, add_bos)
    elif (model_dir / "tokenizer.model").is_file():
        first = hf.convert_ids_to_tokens(hf("a", add_special_tokens=False).input_ids)[0]
        vocab = _sentencepiece_vocab(model_dir / "tokenizer.model", tok, vocab_size, add_bos, first.startswith("\u2581"))
    else:
        raise BadInput(f"SentencePiece-style tokenizer (pre-tokenizer {pre.get('type')}) without its tokenizer.model: "
                       "llama.cpp needs the SentencePiece scores; save tokenizer.model beside the model")
    if len(vocab.tokens) > vocab_size:
        raise BadInput(f"tokenizer has {len(vocab.tokens)} tokens but the model's vocab_size is {vocab_size}")
    return vocab


def _byte_level_vocab(tok: dict, steps: list[dict], byte_level: dict, vocab_size: int, add_bos: bool) -> Vocab:
    pattern = next((s["pattern"].get("Regex") for s in steps if s.get("type") == "Split" and isinstance(s.get("pattern"), dict)), None)
    if pattern is None and byte_level.get("use_regex", True):
        pattern = GPT2_PATTERN
    pre_name = PRE_TOKENIZERS.get(pattern, DEFAULT_PRE_TOKENIZER)
    warnings = [] if pattern in PRE_TOKENIZERS else [
        f"pre-tokenizer split pattern not one llama.cpp names; written as {pre_name!r} after llama.cpp "
        f"tokenized {len(TOKENIZER_PROBES)} probe texts as transformers does"]
    tokens: dict[int, tuple[str, int]] = {i: (t, gguf.TokenType.NORMAL) for t, i in tok["model"]["vocab"].items()}
    for added in tok.get("added_tokens", []):
        tokens[added["id"]] = (added["content"], gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED)
    if max(tokens) >= vocab_size:
        raise BadInput(f"tokenizer has token id {max(tokens)} but the model's vocab_size is {vocab_size}")
    padded = [tokens.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED)) for i in range(vocab_size)]
    return Vocab("gpt2", [t for t, _ in padded], [int(k) for _, k in padded], pre_name, add_bos,
                 proven=pattern in PRE_TOKENIZERS, warnings=warnings)


def _sentencepiece_vocab(path: Path, tok: dict, vocab_size: int, add_bos: bool, space_prefix: bool) -> Vocab:
    """Pieces, scores and kinds as SentencePiece holds them (llama.cpp's SPM tokenizer merges by score);
    transformers' added tokens over them with score -1000, as llama.cpp's converter does. Proven against
    transformers like an unnamed pre-tokenizer: its tokenizer.json is a conversion of this model."""
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(path))
    if sp.vocab_size() > vocab_size:
        raise BadInput(f"tokenizer.model has {sp.vocab_size()} pieces but the model's vocab_size is {vocab_size}")
    tokens, scores = [f"[PAD{i}]" for i in range(vocab_size)], [-10000.0] * vocab_size  # as llama.cpp pads
    types = [int(gguf.TokenType.UNUSED)] * vocab_size
    kinds = ((sp.IsUnknown, gguf.TokenType.UNKNOWN), (sp.IsControl, gguf.TokenType.CONTROL),
             (sp.IsUnused, gguf.TokenType.UNUSED), (sp.IsByte, gguf.TokenType.BYTE))
    for i in range(sp.vocab_size()):
        tokens[i], scores[i] = sp.IdToPiece(i), sp.GetScore(i)
        types[i] = int(next((kind for test, kind in kinds if test(i)), gguf.TokenType.NORMAL))
    for added in tok.get("added_tokens", []):
        i = added["id"]
        if i >= vocab_size:
            raise BadInput(f"tokenizer has token id {i} but the model's vocab_size is {vocab_size}")
        special = added.get("special")
        tokens[i] = added["content"] if special else added["content"].replace("\u2581", " ")
        types[i] = int(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        scores[i] = -1000.0
    return Vocab("llama", tokens, types, DEFAULT_PRE_TOKENIZER, add_bos, proven=False, scores=scores,
                 space_prefix=space_prefix)


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's rotate-half row order -> GGML's interleaved pairs, per head (rows = heads * head_dim)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _encode(t: torch.Tensor, outtype: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """One tensor in the outtype's encoding; 1-D tensors (norms, biases) stay F32 as llama.cpp expects."""
    if t.dim() == 1 or outtype == "f32":
        return t.float().numpy(), gguf.GGMLQuantizationType.F32
    if outtype == "f16":
        return t.to(torch.float16).numpy(), gguf.GGMLQuantizationType.F16
    if outtype == "bf16":
        return t.to(torch.bfloat16).view(torch.uint8).numpy(), gguf.GGMLQuantizationType.BF16
    q8 = gguf.GGMLQuantizationType.Q8_0
    if t.shape[-1] % gguf.GGML_QUANT_SIZES[q8][0]:
        return t.to(torch.float16).numpy(), gguf.GGMLQuantizationType.F16
    # Q8_0 blocks lie along rows, so quantizing a few rows at a time gives the same bytes while the float32
    # copy and the temporaries stay small (a 32000 x 2048 embedding would need ~1 GB at once)
    rows = t.reshape(-1, t.shape[-1])
    out = np.empty(gguf.quants.quant_shape_to_byte_shape(tuple(rows.shape), q8), dtype=np.uint8)
    step = max(1, QUANT_CHUNK_ELEMENTS // rows.shape[1])

    def quantize(i: int) -> None:
        out[i:i + step] = gguf.quants.quantize(rows[i:i + step].float().numpy(), q8)

    # numpy releases the GIL inside gguf-py's ufuncs: chunks quantize in parallel
    list(_QUANT_POOL.map(quantize, range(0, rows.shape[0], step)))
    return out.reshape(gguf.quants.quant_shape_to_byte_shape(tuple(t.shape), q8)), q8


def _encoded_info(shape: tuple[int, ...], outtype: str) -> tuple[tuple[int, ...], np.dtype, int, gguf.GGMLQuantizationType]:
    """What _encode will produce, from the shape alone (the writer declares every tensor first)."""
    qtype = _encode(torch.zeros((1,) * (len(shape) - 1) + (shape[-1],), dtype=torch.float32), outtype)[1]
    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        dtype = np.dtype(np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16)
        return shape, dtype, int(np.prod(shape)) * dtype.itemsize, qtype
    byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, qtype)
    return byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), qtype


def _write_metadata(w: gguf.GGUFWriter, plan: Plan, outtype: str, name: str) -> None:
    w.add_type(gguf.GGUFType.MODEL)
    _write_general(w, plan, name)
    w.add_file_type(OUTTYPES[outtype].file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _write_hparams(w, plan)
    _write_tokenizer(w, plan)


def _write_general(w: gguf.GGUFWriter, plan: Plan, name: str) -> None:
    """general.* as llama.cpp's converter writes them: gguf-py's metadata from the model card and the folder
    name (basename, version, size label, license, base models, tags)."""
    params = sum(int(np.prod(t.shape)) for t in plan.tensors if t.read)
    per_expert = sum(int(np.prod(t.shape[1:])) for t in plan.tensors if t.experts)
    experts = plan.hparams["expert_count"] or 0
    logging.getLogger("gguf.metadata").setLevel(logging.ERROR)
    meta = gguf.Metadata.load(None, plan.model.path, None, params)
    meta.name = meta.name or name
    meta.size_label = meta.size_label or gguf.size_label(params, params - per_expert * experts, per_expert, experts)
    meta.set_gguf_meta_model(w)


def _write_hparams(w: gguf.GGUFWriter, plan: Plan) -> None:
    """The architecture's hyperparameters: sizes, attention, RoPE and its scaling, experts, and the keys
    particular to the architecture."""
    h = plan.hparams
    w.add_context_length(h["context_length"])
    w.add_embedding_length(h["embedding_length"])
    w.add_feed_forward_length(h["feed_forward_length"])
    w.add_block_count(h["block_count"])
    w.add_head_count(h["head_count"])
    w.add_head_count_kv(h["head_count_kv"])
    w.add_key_length(h["head_dim"])
    w.add_value_length(h["head_dim"])
    w.add_rope_dimension_count(h["head_dim"])
    w.add_layer_norm_rms_eps(h["rms_eps"])
    w.add_rope_freq_base(h["rope_theta"])
    if h["rope_theta_swa"] is not None:
        w.add_rope_freq_base_swa(h["rope_theta_swa"])
    for key in ("expert_count", "expert_used_count", "expert_feed_forward_length", "expert_shared_feed_forward_length"):
        if h[key] is not None:
            getattr(w, f"add_{key}")(h[key])
    if h["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(h["rope_factor"])
    elif h["rope_type"] == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(h["rope_factor"])
        w.add_rope_scaling_orig_ctx_len(h["rope_original_context"])
    elif h["rope_type"] in LONGROPE:  # the attention factor transformers multiplies cos/sin by
        scale = h["context_length"] / h["rope_original_context"]
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(h["rope_original_context"])) if scale > 1 else 1.0)
    config = plan.model.config
    rope = _rope_parameters(config)[0]
    for field_name, method in CONVERTIBLE[plan.arch_name].extra_keys:
        getattr(w, method)((config[field_name] if field_name in config else rope.get(field_name)) or 0)
    if CONVERTIBLE[plan.arch_name].swa_layers:
        w.add_sliding_window_pattern(_sliding_layers(config))


def _write_tokenizer(w: gguf.GGUFWriter, plan: Plan) -> None:
    """The vocabulary: its size, tokens, scores and types, then the special tokens and chat template."""
    vocab_size = plan.hparams["vocab_size"]
    w.add_vocab_size(vocab_size)
    vocab = plan.vocab
    w.add_tokenizer_model(vocab.model)
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        w.add_token_scores(vocab.scores)
        w.add_add_space_prefix(vocab.space_prefix)
    w.add_token_types(vocab.types)
    # gguf-py logs every template detail it cannot map; the converter reports what matters itself
    logging.getLogger("gguf.vocab").setLevel(logging.ERROR)
    special = gguf.SpecialVocab(plan.model.path, load_merges=vocab.model == "gpt2", n_vocab=vocab_size)
    special.add_special_token["bos"] = vocab.add_bos  # what the tokenizer really does, always written
    special.add_to_gguf(w, quiet=True)


def write_direct(plan: Plan, outtype: str, path: Path, name: str, on_tensor: Callable[[int, int], None] | None = None) -> str:
    """Stream one direct outtype (f32/f16/bf16/q8_0) to ``path``; returns the file's sha256, computed by a
    thread that reads behind the writer."""
    w = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf_arch(CONVERTIBLE[plan.arch_name])])
    _write_metadata(w, plan, outtype, name)
    for t in plan.tensors:
        shape, dtype, nbytes, qtype = _encoded_info(t.shape, "f32" if t.float32 else outtype)
        w.add_tensor_info(t.gguf_name, shape, dtype, nbytes, raw_dtype=qtype)
    w.write_header_to_file(path)
    hasher = FollowingHasher(path)
    try:
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for i, t in enumerate(plan.tensors):
            w.write_tensor_data(_encode(source_data(plan, t), "f32" if t.float32 else outtype)[0])
            w.fout[0].flush()  # let the hasher follow
            if on_tensor:
                on_tensor(i + 1, len(plan.tensors))
    finally:
        w.close()
        digest = hasher.finish()
    return digest


def source_data(plan: Plan, t: Tensor) -> torch.Tensor:
    """A tensor as the converter means it, before encoding: read (experts stacked), q/k permuted, offset."""
    data = t.values if not t.read else plan.model.store.get(t.hf_name) if t.hf_name else \
        torch.stack([plan.model.store.get(n) for n in t.experts])
    if t.permute_heads:
        data = _permute(data, t.permute_heads)
    if t.offset:  # in float32, as llama.cpp's converter does (bf16 would round 1 + w to 2^-8)
        data = data.float() + t.offset
    return data


def read_back(plan: Plan, path: Path) -> dict:
    """The written file decoded by gguf-py against the source (convert/gguf_readback.py); a file that does not
    hold what was meant is an artifact failure, raised before it is renamed into place."""
    from functools import partial

    try:
        read = read_back_gguf(path, {t.gguf_name: partial(source_data, plan, t) for t in plan.tensors}).as_dict()
    except GgufReadBackError as exc:
        raise ArtifactFailed(f"read-back of {path.name}: {exc}") from None
    if read["failures"]:
        raise ArtifactFailed(f"read-back: {read['failures'][0]}" + (f" (and {len(read['failures']) - 1} more)" if len(read["failures"]) > 1 else ""))
    return read


TOKENIZE_SCRIPT = """
import json, sys, llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], vocab_only=True, verbose=False)
print(json.dumps([llm.tokenize(t.encode(), add_bos=False, special=special) for t, special in json.loads(sys.argv[2])]))
"""


def prove_tokenizer(plan: Plan, path: Path, python: str) -> list[dict]:
    """How llama.cpp's reading of a file's tokenizer differs from transformers on the probe texts (code, prose,
    digits, unicode, whitespace runs, text after a special token), for a tokenizer llama.cpp does not know to
    be transformers' (an unnamed pre-tokenizer split, written as its default; a SentencePiece model, which
    transformers runs as its own conversion): one entry per text split otherwise, empty when none is."""
    from transformers import AutoTokenizer

    check_installed(ENGINES["llamacpp"], python)
    hf = AutoTokenizer.from_pretrained(plan.model.path, trust_remote_code=remote_code_trusted())
    # text after a special token too: llama.cpp's SentencePiece tokenizer starts every such piece with a space
    marker = hf.eos_token or hf.bos_token
    probes = [(t, False) for t in TOKENIZER_PROBES] + ([(marker + t, True) for t in SPECIAL_PROBES] if marker else [])
    # and verify's own texts, special tokens read as llama.cpp's server reads them: verify then accepts exactly these
    probes += [(t, True) for t in probe_texts(hf)]
    done = subprocess.run([python, "-c", TOKENIZE_SCRIPT, str(path), json.dumps(probes)], capture_output=True,
                          text=True, preexec_fn=lambda: set_parent_death_signal(signal.SIGKILL))
    if done.returncode != 0:
        raise EnvironmentProblem(f"llama.cpp could not read the written GGUF's tokenizer: {done.stderr.strip()[-300:]}")
    theirs = json.loads(done.stdout.strip().splitlines()[-1])
    differences = []
    for (text, _), got in zip(probes, theirs):
        expected = hf(text, add_special_tokens=False).input_ids
        if got != expected:
            differences.append({"text": text, "transformers": [hf.convert_ids_to_tokens(expected), expected],
                                "llamacpp": [hf.convert_ids_to_tokens(got), got]})
    return differences


def _tokenizer_verdict(plan: Plan, differences: list[dict], on_event) -> None:
    """Refuse a file whose tokenizer llama.cpp splits otherwise, unless the user accepted that (then warn)."""
    if not differences:
        return
    first = differences[0]
    kind = ("SentencePiece" if plan.vocab.model == "llama" else
            f"byte-level BPE with an unnamed split pattern, written as {plan.vocab.pre!r},")
    line = (f"llama.cpp's tokenizer for this {kind} tokenizer splits {first['text'][:30]!r} differently from "
            f"transformers ({len(first['llamacpp'][1])} tokens vs {len(first['transformers'][1])})")
    if not plan.accept_tokenizer_difference:
        raise BadInput(f"{line}: not converted (--accept-tokenizer-difference writes it and records the difference)")
    on_event(f"warning: {line} and on {len(differences) - 1} more probe text(s); written as accepted, recorded in the manifest")


def quantize_with_llamacpp(source: Path, target: Path, outtype: str, python: str, threads: int, imatrix: dict | None = None) -> None:
    """Quantize the GGUF ``source`` to ``target`` as ``outtype`` with llama.cpp's quantize (QUANTIZE_SCRIPT, run by
    ``python``, the llama.cpp engine's interpreter, on ``threads`` threads); ``imatrix``: the importance matrix
    as that script reads it, or None. A failure is an EnvironmentProblem quoting the tail of its output."""
    ftype = int(OUTTYPES[outtype].file_type)
    result = subprocess.run([python, "-c", QUANTIZE_SCRIPT, str(source), str(target), str(ftype), str(threads), json.dumps(imatrix)],
                            capture_output=True, text=True, preexec_fn=lambda: set_parent_death_signal(signal.SIGKILL))
    if result.returncode != 0 or not target.exists():
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-5:])
        raise EnvironmentProblem(f"llama.cpp quantize to {outtype} failed (exit {result.returncode}): {tail}")


def output_paths(model_dir: Path, outtypes: list[str], out: Path | None) -> dict[str, Path]:
    """The GGUF file for each outtype: ``out`` itself when it is a ``.gguf`` path and one outtype is asked for,
    else ``<stem>-<TYPE>.gguf`` in the folder ``out``, or without ``out`` beside the model folder (output_stem)."""
    named = output_stem(model_dir)
    stem = named.name
    if out is not None and len(outtypes) == 1 and str(out).endswith(".gguf"):
        return {outtypes[0]: Path(out).absolute()}
    folder = Path(out).absolute() if out is not None else named.parent
    return {t: folder / f"{stem}-{OUTTYPES[t].label}.gguf" for t in outtypes}


def convert_gguf(
    model_dir: Path,
    outtypes: list[str],
    out: Path | None = None,
    force: bool = False,
    llamacpp_python: str | None = None,
    on_tensor: Callable[[int, int], None] | None = None,
    on_event: Callable[[str], None] = lambda message: None,
    record: dict | None = None,
    imatrix: Calibration | None = None,
    accept_tokenizer_difference: bool = False,
) -> list[dict]:
    """Write one GGUF per outtype; returns one manifest step per file (``record``'s fields added to each).
    ``imatrix``: compute llama.cpp's importance matrix on this calibration text for its quantize types.
    ``accept_tokenizer_difference``: write a file whose tokenizer llama.cpp splits otherwise than
    transformers, recording the texts and both splits in its manifest."""
    model_dir = Path(model_dir)
    plan = plan_conversion(model_dir)
    plan.accept_tokenizer_difference = accept_tokenizer_difference
    paths = output_paths(model_dir, outtypes, out)
    check_imatrix_use(outtypes, imatrix)
    if imatrix is not None and any(t.experts for t in plan.tensors):
        raise BadInput("--imatrix does not cover MoE experts yet (llama.cpp wants one matrix per expert tensor); "
                       "convert without it")
    for path in paths.values():
        if path.exists() and not force:
            raise BadInput(f"output exists: {path} (use --force to replace it)")
    indirect = [t for t in outtypes if not OUTTYPES[t].direct]
    python = None
    if indirect or not plan.vocab.proven:  # llama.cpp's quantize, or the tokenizer proof
        spec = ENGINES["llamacpp"]
        python = engine_python(spec, llamacpp_python)
        check_installed(spec, python)
    with ThreadPoolExecutor(1) as pool:
        # the input's hash overlaps the conversion (hashlib releases the GIL)
        conversion = _Conversion(plan=plan, model_dir=model_dir, outtypes=outtypes, paths=paths, force=force, python=python,
                                 name=output_stem(model_dir).name, input_digest=pool.submit(folder_digest, model_dir),
                                 on_tensor=on_tensor, on_event=on_event, extra=record or {}, imatrix=imatrix)
        steps = _convert_all(conversion)
    return steps


def check_imatrix_use(outtypes: list[str], imatrix: Calibration | None) -> None:
    """Refuse outtypes that need an importance matrix without ``imatrix``, and an ``imatrix`` that none of
    ``outtypes`` uses (the direct types are written without llama.cpp's quantize)."""
    needing = [t for t in outtypes if OUTTYPES[t].needs_imatrix]
    if needing and imatrix is None:
        raise BadInput(f"llama.cpp makes {OUTTYPES[needing[0]].label} only with an importance matrix: add --imatrix")
    if imatrix is not None and all(OUTTYPES[t].direct for t in outtypes):
        raise BadInput("--imatrix applies to llama.cpp's quantize types (K- and IQ-quants, Q4_0...), not to "
                       f"{', '.join(OUTTYPES[t].label for t in outtypes)}")


@dataclass
class _Conversion:
    """One convert_gguf call: what every file it writes shares."""

    plan: Plan
    model_dir: Path
    outtypes: list[str]
    paths: dict[str, Path]  # outtype -> output file
    force: bool
    python: str | None  # the llama.cpp engine's interpreter (quantize, the tokenizer proof)
    name: str  # general.name when the model card gives none
    input_digest: Future  # the input folder's sha256, hashed alongside the conversion
    on_tensor: Callable[[int, int], None] | None
    on_event: Callable[[str], None]
    extra: dict  # fields added to every manifest step
    imatrix: Calibration | None
    # texts llama.cpp tokenizes otherwise than transformers (accepted by the user); None until the first file
    # written proves a tokenizer that needs it
    tokenizer_differences: list[dict] | None = field(init=False)

    def __post_init__(self) -> None:
        self.tokenizer_differences = [] if self.plan.vocab.proven else None


def _convert_all(c: _Conversion) -> list[dict]:
    """Every outtype's file; returns their manifest steps. The direct types first, then llama.cpp's quantize types."""
    steps = [_write_direct_file(c, outtype) for outtype in c.outtypes if OUTTYPES[outtype].direct]
    indirect = [t for t in c.outtypes if not OUTTYPES[t].direct]
    if indirect:
        steps += _quantize_files(c, indirect)
    return steps


def _write_direct_file(c: _Conversion, outtype: str) -> dict:
    t0, started = time.perf_counter(), now()
    path = c.paths[outtype]
    c.on_event(f"writing {path.name}")
    with atomic_output_file(path, c.force) as tmp:
        digest = write_direct(c.plan, outtype, tmp, c.name, c.on_tensor)
        step = _record_file(c, outtype, tmp, t0, started, digest)
    return step


def _quantize_files(c: _Conversion, indirect: list[str]) -> list[dict]:
    """llama.cpp's quantize types, all from one F16 pass (a scratch file unless F16 was asked for)."""
    f16_path = c.paths.get("f16")
    # named like a partial output of the first quantization, so a killed run's scratch is cleaned up
    first = c.paths[indirect[0]]
    first.parent.mkdir(parents=True, exist_ok=True)
    scratch = None if f16_path else first.with_name(f".{first.name}.partial-f16-{os.getpid()}")
    imatrix_file = first.with_name(f".{first.name}.partial-imatrix-{os.getpid()}.npz")
    try:
        if scratch is not None:
            c.on_event("writing the F16 pass for llama.cpp's quantize")
            write_direct(c.plan, "f16", scratch, c.name, c.on_tensor)
        imatrix, imatrix_options = _importance_matrix(c, imatrix_file) if c.imatrix is not None else (None, None)
        steps = []
        for outtype in indirect:
            t0, started = time.perf_counter(), now()
            c.on_event(f"llama.cpp quantize -> {c.paths[outtype].name}")
            with atomic_output_file(c.paths[outtype], c.force) as tmp:
                quantize_with_llamacpp(f16_path or scratch, tmp, outtype, c.python, cpu_threads(usable_cpus(), dict(os.environ)), imatrix)
                steps.append(_record_file(c, outtype, tmp, t0, started, sha256_file(tmp), imatrix_options))
        return steps
    finally:
        if scratch is not None:
            scratch.unlink(missing_ok=True)
        imatrix_file.unlink(missing_ok=True)


def _importance_matrix(c: _Conversion, imatrix_file: Path) -> tuple[dict, dict]:
    """llama.cpp's importance matrix on the calibration text, saved to ``imatrix_file``; returns the quantize
    script's imatrix argument and the options the manifests record."""
    cal = c.imatrix
    c.on_event(f"importance matrix on {cal.samples} x {cal.seq_len} tokens of {cal.data}, layer by layer")
    clock = time.perf_counter()
    computed = importance_matrix(c.model_dir, {t.hf_name: t.gguf_name for t in c.plan.tensors if t.hf_name}, cal)
    computed.save(imatrix_file)
    imatrix = {"path": str(imatrix_file), "file": "workbench (layer runner)", "dataset": cal.data,
               "chunks": computed.chunks}
    options = {"data": cal.data, "samples": cal.samples, "seq_len": cal.seq_len, "seed": cal.seed,
               "entries": len(computed.values), "seconds": round(time.perf_counter() - clock, 2)}
    return imatrix, options


def _record_file(c: _Conversion, outtype: str, content: Path, t0: float, started: str, sha256: str,
                 imatrix_options: dict | None = None) -> dict:
    """The sidecar manifest, written before the file is renamed into place (see write_file_manifest); returns
    its step. The first file written proves an unnamed pre-tokenizer first (a failure leaves nothing)."""
    if c.tokenizer_differences is None:
        c.tokenizer_differences = prove_tokenizer(c.plan, content, c.python)
        _tokenizer_verdict(c.plan, c.tokenizer_differences, c.on_event)
    path, differences, plan = c.paths[outtype], c.tokenizer_differences, c.plan
    accepted = {"accept_tokenizer_difference": True} if plan.accept_tokenizer_difference else {}
    step = {
        "verb": "convert-gguf", "started": started, "seconds": round(time.perf_counter() - t0, 2),
        "inputs": {"model": c.input_digest.result()},
        "options": {"outtype": outtype, "out": str(path), **({"imatrix": imatrix_options} if imatrix_options else {}), **accepted},
        **({"tokenizer_differences": differences} if differences else {}),
        "versions": tool_versions(),
        "metrics": {"tensors": len(plan.tensors), "file_type": OUTTYPES[outtype].label, "bytes": content.stat().st_size,
                    "tokenizer": plan.vocab.model, "pre_tokenizer": plan.vocab.pre, **quant_census(content, OUTTYPES[outtype].label),
                    "read_back": read_back(plan, content)},
        "warnings": plan.warnings, "status": "ok", **c.extra,
    }
    write_file_manifest(path, step, parent=c.model_dir, sha256=sha256, content=content)
    return {"output": str(path), **step}


ADAPTER_OUTTYPES = ("f32", "f16", "bf16")


def convert_lora_adapter(
    base_dir: Path, adapter_dir: Path, outtype: str = "f16", out: Path | None = None, force: bool = False,
) -> dict:
    """A peft LoRA adapter as a llama.cpp LoRA GGUF (load it with ``--lora`` / ``lora_path`` on the base's
    GGUF). llama.cpp scales each pair by adapter.lora.alpha / rank; scales that differ per module (rsLoRA,
    rank and alpha patterns) are folded into lora_b. Checked against the base like ``workbench merge``."""
    from ..lora import plan_merge

    if outtype not in ADAPTER_OUTTYPES:
        raise BadInput(f"adapter outtype must be one of {', '.join(ADAPTER_OUTTYPES)}, got {outtype}")
    merge_plan = plan_merge(base_dir, adapter_dir)
    unsupported = [o.name for o in merge_plan.outputs if o.from_adapter] + \
        [d.module for d in merge_plan.deltas if d.magnitude or d.kind != "linear" or d.fan_in_fan_out]
    if unsupported:
        raise BadInput(f"llama.cpp LoRA adapters hold linear LoRA pairs only ({unsupported[0]} is not one); "
                       "use `workbench merge`, then convert the merged model")
    plan = plan_conversion(base_dir)
    by_weight = {t.hf_name: t for t in plan.tensors}
    alpha = float(merge_plan.adapter_config["lora_alpha"])
    named = output_stem(adapter_dir)
    path = Path(out).absolute() if out else named.with_name(f"{named.name}-{OUTTYPES[outtype].label}.gguf")
    if path.exists() and not force:
        raise BadInput(f"output exists: {path} (use --force to replace it)")
    t0, started = time.perf_counter(), now()
    pairs = []
    for d in merge_plan.deltas:
        target = by_weight[d.module + ".weight"]
        a = merge_plan.adapter.get(d.a).float()
        b = merge_plan.adapter.get(d.b).float() * (d.scale * a.shape[0] / alpha)
        if target.permute_heads:
            b = _permute(b, target.permute_heads)
        pairs += [(target.gguf_name + ".lora_a", a), (target.gguf_name + ".lora_b", b)]
    with atomic_output_file(path, force) as tmp:
        w = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf_arch(CONVERTIBLE[plan.arch_name])])
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_name(output_stem(adapter_dir).name)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        w.add_file_type(OUTTYPES[outtype].file_type)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for name, tensor in pairs:
            data, qtype = _encode(tensor, outtype)
            w.add_tensor(name, data, raw_dtype=qtype)
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    step = {"verb": "convert-gguf-adapter", "started": started, "seconds": round(time.perf_counter() - t0, 2),
            "inputs": {"base": folder_digest(base_dir), "adapter": folder_digest(adapter_dir)},
            "options": {"outtype": outtype, "out": str(path)}, "versions": tool_versions(),
            "metrics": {"lora_pairs": len(pairs) // 2, "alpha": alpha, "bytes": path.stat().st_size}, "status": "ok"}
    write_file_manifest(path, step, parent=None)
    return {"output": str(path), **step}


def _base_type(label: str) -> gguf.GGMLQuantizationType:
    """The tensor type a file type is named after: Q4_K_M -> Q4_K, Q8_0 -> Q8_0."""
    for name in (label, label.rsplit("_", 1)[0]):
        if name in gguf.GGMLQuantizationType.__members__:
            return gguf.GGMLQuantizationType[name]
    raise ValueError(f"no tensor type for file type {label}")


def quant_census(path: Path, label: str) -> dict:
    """What a GGUF really holds, read back from the file: bits per weight over all tensors, how many tensors
    of each type, and the matrices llama.cpp stored in another type because their rows are not a multiple of
    the file type's block (K-quants: 256), so a "Q4_K_M" file is not silently 6 bits per weight."""
    base = _base_type(label)
    block = gguf.GGML_QUANT_SIZES[base][0]
    elements = size = 0
    types: dict[str, int] = {}
    fallbacks = []
    for t in gguf.GGUFReader(path).tensors:
        elements, size = elements + int(t.n_elements), size + int(t.n_bytes)
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        row = int(t.shape[0])  # gguf-py lists dimensions innermost first: the row length
        if len(t.shape) >= 2 and row % block:
            fallbacks.append({"tensor": t.name, "type": t.tensor_type.name,
                              "why": f"rows of {row} are not a multiple of {base.name}'s block of {block}"})
    return {"bits_per_weight": round(8 * size / max(elements, 1), 3), "tensor_types": types, "fallbacks": fallbacks,
            "fallback_tensors": len(fallbacks)}


def gguf_metadata(path: Path) -> dict:
    """Key/value metadata of a GGUF file (gguf-py's reader), for inspection and tests."""
    reader = gguf.GGUFReader(path)
    meta = {}
    for key, field_ in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        meta[key] = field_.contents()
    return meta

