"""`workbench convert gguf --adapter`: a peft LoRA adapter as a llama.cpp LoRA GGUF, written beside the base's
conversion plan (the same tensor names and q/k permutation)."""

from __future__ import annotations

import time
from pathlib import Path

import gguf

from ..errors import BadInput
from ..hub import output_stem
from ..manifest import folder_digest, now, tool_versions, write_file_manifest
from ..outputs import atomic_output_file
from .gguf_tables import CONVERTIBLE, OUTTYPES, gguf_arch
from .plan import permute_heads, plan_conversion
from .writer import encode


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
            b = permute_heads(b, target.permute_heads)
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
            data, qtype = encode(tensor, outtype)
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
