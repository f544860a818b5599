"""Writes a large synthetic Llama checkpoint (random bf16 weights in a real model's shape: TinyLlama-1.1B,
Llama-3.1-8B, or four layers of Llama-3.1-70B's width; several shards) and a random r=16 LoRA adapter on
all its projections, for benchmarks. Cached; streamed through the
workbench's own writer, so it never holds the model in memory.

    python scripts/make_synthetic.py [--root DIR] [--shape NAME]      prints the base and adapter folders
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import torch

from workbench.checkpoint import PlannedTensor, StreamedWriter, plan_shards

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
SHAPES = {  # name -> the real model's config fields that set its size (random weights)
    "tinyllama-1.1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
                       "num_key_value_heads": 4, "vocab_size": 32000, "rope_theta": 10000.0, "max_position_embeddings": 2048},
    "llama-3.1-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "vocab_size": 128256, "rope_theta": 500000.0, "max_position_embeddings": 131072,
                     "rope_scaling": LLAMA3_ROPE},
    # four layers of Llama-3.1-70B's width: what one 70B layer costs, without 140 GB on disk
    "llama-70b-slice": {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 4, "num_attention_heads": 64,
                        "num_key_value_heads": 8, "vocab_size": 128256, "rope_theta": 500000.0, "max_position_embeddings": 131072,
                        "rope_scaling": LLAMA3_ROPE},
}
SHARD_BYTES = 5 * 10**9 // 10  # 500 MB shards for the 1.1B; the large shapes use 5 GB, as their hub checkpoints
LORA_RANK = 16


def llama_config(**shape) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
            "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "dtype": "bfloat16", **shape}


def projections(config: dict) -> dict[str, tuple[int, int]]:
    """module -> (out, in) features of one decoder layer."""
    h, i = config["hidden_size"], config["intermediate_size"]
    kv = h // config["num_attention_heads"] * config["num_key_value_heads"]
    return {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h), "self_attn.o_proj": (h, h),
            "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}


def base_tensors(config: dict) -> list[PlannedTensor]:
    h, v = config["hidden_size"], config["vocab_size"]
    out = [PlannedTensor("model.embed_tokens.weight", torch.bfloat16, (v, h))]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [PlannedTensor(p + "input_layernorm.weight", torch.bfloat16, (h,)),
                PlannedTensor(p + "post_attention_layernorm.weight", torch.bfloat16, (h,))]
        out += [PlannedTensor(f"{p}{m}.weight", torch.bfloat16, s) for m, s in projections(config).items()]
    return out + [PlannedTensor("model.norm.weight", torch.bfloat16, (h,)), PlannedTensor("lm_head.weight", torch.bfloat16, (v, h))]


def random_like(t: PlannedTensor, gen: torch.Generator, std: float) -> torch.Tensor:
    if len(t.shape) == 1:
        return torch.ones(t.shape, dtype=t.dtype)
    return (torch.randn(t.shape, generator=gen) * std).to(t.dtype)


def write_base(folder: Path, config: dict, shard_bytes: int = SHARD_BYTES) -> None:
    gen = torch.Generator().manual_seed(0)
    planned = base_tensors(config)
    writer = StreamedWriter(folder, plan_shards(planned, shard_bytes))
    for t in planned:
        writer.write(t.name, random_like(t, gen, 0.02))
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def write_adapter(folder: Path, base: Path, config: dict) -> None:
    gen = torch.Generator().manual_seed(1)
    planned = []
    for i in range(config["num_hidden_layers"]):
        for m, (o, n) in projections(config).items():
            p = f"base_model.model.model.layers.{i}.{m}"
            planned += [PlannedTensor(p + ".lora_A.weight", torch.float32, (LORA_RANK, n)),
                        PlannedTensor(p + ".lora_B.weight", torch.float32, (o, LORA_RANK))]
    writer = StreamedWriter(folder, plan_shards(planned, 1 << 40))
    for t in planned:
        writer.write(t.name, random_like(t, gen, 0.01))
    os.rename(folder / "model.safetensors", folder / "adapter_model.safetensors")
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": LORA_RANK, "lora_alpha": 2 * LORA_RANK, "lora_dropout": 0.0,
        "target_modules": [m.split(".")[-1] for m in projections(config)], "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "modules_to_save": None, "base_model_name_or_path": str(base),
    }
    (folder / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))


def ensure(root: Path, shape: str = "tinyllama-1.1b", layers: int | None = None) -> tuple[Path, Path]:
    """The base and its r=16 adapter for a shape (optionally with fewer layers: the same width, for peak
    memory, which does not depend on depth), made once (a folder is complete when it has .complete)."""
    config = llama_config(**{**SHAPES[shape], **({"num_hidden_layers": layers} if layers else {})})
    shard = SHARD_BYTES if shape == "tinyllama-1.1b" else 10 * SHARD_BYTES
    name = f"synthetic-{shape}" + (f"-{layers}-layers" if layers else "")
    base, adapter = root / name, root / f"{name}-lora-r{LORA_RANK}"
    for folder, make in ((base, lambda f: write_base(f, config, shard)), (adapter, lambda f: write_adapter(f, base, config))):
        if not (folder / ".complete").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            make(folder)
            (folder / ".complete").write_text("")
    return base, adapter


def default_root() -> Path:
    return Path(os.environ.get("WORKBENCH_HOME", Path.home() / ".cache" / "workbench")) / "bench"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=default_root())
    parser.add_argument("--shape", choices=list(SHAPES), default="tinyllama-1.1b")
    parser.add_argument("--layers", type=int, help="fewer decoder layers than the shape has (same width)")
    args = parser.parse_args()
    base, adapter = ensure(args.root, args.shape, args.layers)
    print(base)
    print(adapter)
