"""Writing a planned GGUF with gguf-py's writer, one tensor at a time (every tensor's info declared first, from
the shapes alone), and reading the written file back: gguf-py's decoding against the source, and a census of
the tensor types llama.cpp really stored."""

from __future__ import annotations

import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
import torch

from ..checkpoint import FollowingHasher
from ..gguffiles import gguf_parts
from ..errors import ArtifactFailed
from .gguf_readback import GgufReadBackError, read_back_gguf
from .gguf_tables import CONVERTIBLE, OUTTYPES, gguf_arch
from ..options import TensorTypes
from .plan import LONGROPE, OUTPUT, Plan, rope_parameters, sliding_layers, source_data, tensor_outtype


QUANT_CHUNK_ELEMENTS = 1 << 20
# gguf-py warns "not splitting" when a split set fits in one file: that file is the output, as asked
logging.getLogger("gguf.gguf_writer").setLevel(logging.ERROR)


_QUANT_POOL = ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1)))


def encode(t: torch.Tensor, outtype: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
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
    """What encode will produce, from the shape alone (the writer declares every tensor first)."""
    qtype = encode(torch.zeros((1,) * (len(shape) - 1) + (shape[-1],), dtype=torch.float32), outtype)[1]
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
    rope = rope_parameters(config)[0]
    for field_name, method in CONVERTIBLE[plan.arch_name].extra_keys:
        getattr(w, method)((config[field_name] if field_name in config else rope.get(field_name)) or 0)
    if CONVERTIBLE[plan.arch_name].swa_layers:
        w.add_sliding_window_pattern(sliding_layers(config))


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


def write_direct(plan: Plan, outtype: str, path: Path, name: str, on_tensor: Callable[[int, int], None] | None = None,
                 types: TensorTypes = TensorTypes(), split_max_size: int = 0) -> str | None:
    """Stream one direct outtype (f32/f16/bf16/q8_0) to ``path``, each tensor in the type ``types`` chooses for it
    (plan.tensor_outtype); returns the file's sha256, computed by a thread that reads behind the writer. With
    ``split_max_size`` (bytes of tensor data per file) gguf-py's writer splits it into llama.cpp's named parts
    beside ``path`` (returns None: the manifest hashes the parts), or writes ``path`` alone when it fits in one."""
    has_output = any(t.gguf_name == OUTPUT for t in plan.tensors)
    each = [tensor_outtype(t, outtype, types, has_output) for t in plan.tensors]
    w = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf_arch(CONVERTIBLE[plan.arch_name])],
                        split_max_size=split_max_size)
    _write_metadata(w, plan, outtype, name)
    for t, kind in zip(plan.tensors, each):
        shape, dtype, nbytes, qtype = _encoded_info(t.shape, kind)
        w.add_tensor_info(t.gguf_name, shape, dtype, nbytes, raw_dtype=qtype)
    w.write_header_to_file(path)
    hasher = FollowingHasher(path) if len(w.fout) == 1 else None
    try:
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for i, (t, kind) in enumerate(zip(plan.tensors, each)):
            w.write_tensor_data(encode(source_data(plan, t), kind)[0])
            w.flush()  # let the hasher follow
            if on_tensor:
                on_tensor(i + 1, len(plan.tensors))
    finally:
        w.close()
        digest = hasher.finish() if hasher else None
    return digest


def split_file(single: Path, path: Path, split_max_size: int) -> None:
    """Rewrite the GGUF ``single`` as llama.cpp's split parts beside ``path`` (its name the parts' stem), at most
    ``split_max_size`` bytes of tensor data each: every key but the split keys, and every tensor's bytes as they
    are (what llama.cpp's gguf-split does; llama.cpp's quantize can only keep its input's splits, and an F16
    input's would leave a 4-bit file's parts a quarter of the size asked for)."""
    reader = gguf.GGUFReader(single)
    w = gguf.GGUFWriter(path=None, arch=reader.fields["general.architecture"].contents(), split_max_size=split_max_size)
    for key, f in reader.fields.items():
        if key.startswith(("GGUF.", "split.")) or key == "general.architecture":
            continue
        if key == "general.alignment":
            w.add_custom_alignment(f.contents())
            continue
        w.add_key_value(key, f.contents(), f.types[0], sub_type=f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None)
    for t in reader.tensors:
        w.add_tensor_info(t.name, t.data.shape, t.data.dtype, int(t.n_bytes), raw_dtype=gguf.GGMLQuantizationType(t.tensor_type))
    w.write_header_to_file(path)
    try:
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for t in reader.tensors:
            w.write_tensor_data(t.data)
    finally:
        w.close()


def read_back(plan: Plan, path: Path) -> dict:
    """The written file (or split set: its folder) decoded by gguf-py against the source (convert/gguf_readback.py);
    a file that does not hold what was meant is an artifact failure, raised before it is renamed into place."""
    from functools import partial

    try:
        read = read_back_gguf(gguf_parts(path), {t.gguf_name: partial(source_data, plan, t) for t in plan.tensors}).as_dict()
    except GgufReadBackError as exc:
        raise ArtifactFailed(f"read-back of {path.name}: {exc}") from None
    if read["failures"]:
        raise ArtifactFailed(f"read-back: {read['failures'][0]}" + (f" (and {len(read['failures']) - 1} more)" if len(read["failures"]) > 1 else ""))
    return read


def _base_type(label: str) -> gguf.GGMLQuantizationType:
    """The tensor type a file type is named after: Q4_K_M -> Q4_K, Q8_0 -> Q8_0."""
    for name in (label, label.rsplit("_", 1)[0]):
        if name in gguf.GGMLQuantizationType.__members__:
            return gguf.GGMLQuantizationType[name]
    raise ValueError(f"no tensor type for file type {label}")


def quant_census(path: Path, label: str) -> dict:
    """What a GGUF really holds, read back from the file: bits per weight over all tensors, how many tensors
    of each type, and the matrices llama.cpp stored in another type because their rows are not a multiple of
    the file type's block (K-quants: 256), so a "Q4_K_M" file is not silently 6 bits per weight. ``path``: a file
    or a split set (every part counted)."""
    base = _base_type(label)
    block = gguf.GGML_QUANT_SIZES[base][0]
    elements = size = 0
    types: dict[str, int] = {}
    fallbacks = []
    for t in (t for part in gguf_parts(path) for t in gguf.GGUFReader(part).tensors):
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
