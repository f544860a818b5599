"""Known-wrong artifacts: a correct quantized artifact copied with one defect a writer could make. Each
returns the copy and the tensor (module) the defect is in; the judges must fail it, naming that module."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def _copy(artifact: Path, out: Path) -> Path:
    """The artifact copied whole; its manifest (naming the source, which verify compares with) comes along."""
    shutil.copytree(artifact, out)
    return out


def _edit(folder: Path, edit) -> None:
    """``edit(tensors)`` on every shard's tensors (in place), written back with the shard's metadata."""
    from safetensors import safe_open

    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            metadata = f.metadata()
        tensors = load_file(shard)
        if edit(tensors):
            save_file(tensors, shard, metadata=metadata)


def _config(folder: Path, edit) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    edit(config["quantization_config"])
    path.write_text(json.dumps(config, indent=2))


def changed(name: str, change):
    """An edit replacing tensor ``name`` (in whichever shard holds it) by ``change(tensor)``."""
    def edit(tensors):
        if name in tensors:
            tensors[name] = change(tensors[name])
            return True
    return edit


def scaled(name: str, factor: float):
    return changed(name, lambda t: t * factor)


def fp8_weight_scale_doubled(artifact: Path, out: Path) -> tuple[Path, str]:
    module = "model.layers.1.mlp.down_proj"
    _edit(_copy(artifact, out), scaled(f"{module}.weight_scale", 2.0))
    return out, module


def fp8_qkv_not_requantized(artifact: Path, out: Path) -> tuple[Path, str]:
    """A writer that quantizes q/k/v with their shared (largest) scale, as vLLM will fuse them, but writes each
    shard's own scale: the shard with the smallest scale reads back too small."""
    layer = "model.layers.1.self_attn"
    _copy(artifact, out)
    scales = {}
    _edit(out, lambda t: scales.update({p: float(t[f"{layer}.{p}.weight_scale"]) for p in ("q_proj", "k_proj", "v_proj")
                                         if f"{layer}.{p}.weight_scale" in t}))
    largest, smallest = max(scales, key=scales.get), min(scales, key=scales.get)

    def edit(tensors):
        name = f"{layer}.{smallest}.weight"
        if name not in tensors:
            return False
        ratio = scales[smallest] / scales[largest]  # requantize the data to the largest scale, keep the own one
        tensors[name] = (tensors[name].float() * ratio).to(tensors[name].dtype)
        return True

    _edit(out, edit)
    return out, f"{layer}.{smallest}"


def fp8_input_scale_zero(artifact: Path, out: Path) -> tuple[Path, str]:
    module = "model.layers.2.mlp.down_proj"  # not fused: vLLM takes no max over shards here
    _edit(_copy(artifact, out), scaled(f"{module}.input_scale", 0.0))
    return out, module


def fp8_lm_head_not_ignored(artifact: Path, out: Path) -> tuple[Path, str]:
    _config(_copy(artifact, out), lambda q: q.update(ignored_layers=[n for n in q["ignored_layers"] if n != "lm_head"]))
    return out, "lm_head"


def gptq_group_size_disagrees(artifact: Path, out: Path) -> tuple[Path, str]:
    """Tensors quantized in groups of 128, the config saying 64."""
    _config(_copy(artifact, out), lambda q: q["config_groups"]["group_0"]["weights"].update(group_size=64))
    return out, "model.layers.0."  # the first module compressed-tensors decodes in that layer


def awq_zero_point_negated(artifact: Path, out: Path) -> tuple[Path, str]:
    """One module's zero points written with the wrong sign (unpacked, negated, packed again by
    compressed-tensors' own int4 packing)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    module = "model.layers.1.mlp.gate_proj"

    def edit(tensors):
        name = f"{module}.weight_zero_point"
        if name not in tensors:
            return False
        packed = tensors[name]
        rows = packed.shape[0] * 8
        zero = unpack_from_int32(packed, 4, torch.Size([rows, packed.shape[1]]), packed_dim=0)
        tensors[name] = pack_to_int32((-zero).clamp(-8, 7).to(zero.dtype), 4, packed_dim=0).contiguous()
        return True

    _edit(_copy(artifact, out), edit)
    return out, module


def fp8_block_scale_missing(artifact: Path, out: Path) -> tuple[Path, str]:
    """A writer that skipped one module's block scales (the index agrees: nothing else is wrong)."""
    module = "model.layers.1.mlp.down_proj"
    _edit(_copy(artifact, out), lambda tensors: tensors.pop(f"{module}.weight_scale_inv", None) is not None)
    index = out / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    del data["weight_map"][f"{module}.weight_scale_inv"]
    index.write_text(json.dumps(data, indent=2))
    return out, module


def fp8_block_scale_nan(artifact: Path, out: Path) -> tuple[Path, str]:
    module = "model.layers.2.self_attn.o_proj"

    def one_nan(t):
        t = t.clone()
        t[0, 1] = float("nan")
        return t

    _edit(_copy(artifact, out), changed(f"{module}.weight_scale_inv", one_nan))
    return out, module


def fp8_block_size_disagrees(artifact: Path, out: Path) -> tuple[Path, str]:
    """Scales for 128x128 blocks, the config saying 64x64."""
    _config(_copy(artifact, out), lambda q: q.update(weight_block_size=[64, 64]))
    return out, "model.layers.0."  # the first module the reader decodes


def fp8_kv_scale_zero(artifact: Path, out: Path) -> tuple[Path, str]:
    tensor = "model.layers.1.self_attn.k_scale"
    _edit(_copy(artifact, out), scaled(tensor, 0.0))
    return out, tensor


def compressed_tensors_kv_scale_zero(artifact: Path, out: Path) -> tuple[Path, str]:
    """The same defect in compressed-tensors' kv_cache_scheme (llm-compressor's scales, shape [1])."""
    return fp8_kv_scale_zero(artifact, out)


def nvfp4_global_scale_doubled(artifact: Path, out: Path) -> tuple[Path, str]:
    """One module's global scale written twice too large: its decoded weights come out half as large."""
    module = "model.layers.1.mlp.down_proj"
    _edit(_copy(artifact, out), scaled(f"{module}.weight_global_scale", 2.0))
    return out, module


def mxfp4_scale_exponent_off_by_one(artifact: Path, out: Path) -> tuple[Path, str]:
    """One module's E8M0 group scales one power of two too large: its decoded weights come out doubled."""
    module = "model.layers.2.self_attn.o_proj"
    _edit(_copy(artifact, out), changed(f"{module}.weight_scale", lambda t: t + 1))
    return out, module


def gguf_q8_0_scales_doubled(artifact: Path, out: Path, tensor_type: str = "ffn_down") -> tuple[Path, str]:
    """A GGUF whose Q8_0 blocks of one tensor type (every layer's) carry twice their scale: the float16 scale that
    opens each 34-byte block, rewritten in place through gguf-py's own reader. Its sidecar manifest comes along."""
    import gguf
    import numpy as np

    shutil.copy2(artifact, out)
    shutil.copy2(artifact.with_name(artifact.name + ".workbench.json"), out.with_name(out.name + ".workbench.json"))
    reader = gguf.GGUFReader(out, "r+")
    for tensor in reader.tensors:
        if f".{tensor_type}." in tensor.name and tensor.tensor_type == gguf.GGMLQuantizationType.Q8_0:
            blocks = tensor.data.reshape(-1).view(np.uint8).reshape(-1, 34)
            scales = blocks[:, :2].copy().view(np.float16)
            blocks[:, :2] = (scales * 2).view(np.uint8)
    reader.data.flush()
    return out, tensor_type



def merge_update_doubled(merged: Path, base: Path, out: Path) -> tuple[Path, str]:
    """A merged artifact whose every LoRA update went in twice (W + 2·s·BA = 2·merged - base, in float32, cast
    back): a merge bug its self-check did not see. Its manifest still names the base and the adapter."""
    from safetensors import safe_open

    def base_tensor(name: str) -> torch.Tensor | None:
        for shard in base.glob("*.safetensors"):
            with safe_open(shard, "pt") as f:
                if name in f.keys():
                    return f.get_tensor(name)
        return None

    changed_names = []

    def edit(tensors):
        for name, t in tensors.items():
            original = base_tensor(name)
            if original is not None and not torch.equal(original, t):
                tensors[name] = (2 * t.float() - original.float()).to(t.dtype)
                changed_names.append(name)
        return bool(changed_names)

    _edit(_copy(merged, out), edit)
    return out, f"{len(changed_names)} merged tensors"

CONTROLS = {
    "nvfp4-a16": [nvfp4_global_scale_doubled],
    "mxfp4-a16": [mxfp4_scale_exponent_off_by_one],
    "fp8-static-kv": [fp8_kv_scale_zero],
    "w8a8-int8-kv": [compressed_tensors_kv_scale_zero],
    "fp8-block": [fp8_block_scale_missing, fp8_block_scale_nan, fp8_block_size_disagrees],
    "fp8": [fp8_weight_scale_doubled, fp8_qkv_not_requantized, fp8_input_scale_zero, fp8_lm_head_not_ignored],
    "gptq-w4a16": [gptq_group_size_disagrees],
    "awq-w4a16": [awq_zero_point_negated],
}
