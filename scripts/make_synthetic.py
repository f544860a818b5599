"""Writes a large synthetic Llama checkpoint (random bf16 weights, TinyLlama-1.1B shape, several shards)
and a random r=16 LoRA adapter on all its projections, for benchmarks. Cached; streamed through the
workbench's own writer, so it never holds the model in memory.

    python scripts/make_synthetic.py [--root DIR]      prints the base and adapter folders
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import torch

from workbench.checkpoint import PlannedTensor, StreamedWriter, plan_shards

CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048, "intermediate_size": 5632,
    "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000,
    "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "dtype": "bfloat16",
}
SHARD_BYTES = 500 * 10**6
LORA_RANK = 16
PROJECTIONS = {  # module -> (out, in)
    "self_attn.q_proj": (2048, 2048), "self_attn.k_proj": (256, 2048), "self_attn.v_proj": (256, 2048),
    "self_attn.o_proj": (2048, 2048), "mlp.gate_proj": (5632, 2048), "mlp.up_proj": (5632, 2048),
    "mlp.down_proj": (2048, 5632),
}


def base_tensors() -> list[PlannedTensor]:
    h, v = CONFIG["hidden_size"], CONFIG["vocab_size"]
    out = [PlannedTensor("model.embed_tokens.weight", torch.bfloat16, (v, h))]
    for i in range(CONFIG["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [PlannedTensor(p + "input_layernorm.weight", torch.bfloat16, (h,)),
                PlannedTensor(p + "post_attention_layernorm.weight", torch.bfloat16, (h,))]
        out += [PlannedTensor(f"{p}{m}.weight", torch.bfloat16, s) for m, s in PROJECTIONS.items()]
    return out + [PlannedTensor("model.norm.weight", torch.bfloat16, (h,)), PlannedTensor("lm_head.weight", torch.bfloat16, (v, h))]


def random_like(t: PlannedTensor, gen: torch.Generator, std: float) -> torch.Tensor:
    if len(t.shape) == 1:
        return torch.ones(t.shape, dtype=t.dtype)
    return (torch.randn(t.shape, generator=gen) * std).to(t.dtype)


def write_base(folder: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    planned = base_tensors()
    writer = StreamedWriter(folder, plan_shards(planned, SHARD_BYTES))
    for t in planned:
        writer.write(t.name, random_like(t, gen, 0.02))
    (folder / "config.json").write_text(json.dumps(CONFIG, indent=2))


def write_adapter(folder: Path, base: Path) -> None:
    gen = torch.Generator().manual_seed(1)
    planned = []
    for i in range(CONFIG["num_hidden_layers"]):
        for m, (o, n) in PROJECTIONS.items():
            p = f"base_model.model.model.layers.{i}.{m}"
            planned += [PlannedTensor(p + ".lora_A.weight", torch.float32, (LORA_RANK, n)),
                        PlannedTensor(p + ".lora_B.weight", torch.float32, (o, LORA_RANK))]
    writer = StreamedWriter(folder, plan_shards(planned, 1 << 40))
    for t in planned:
        writer.write(t.name, random_like(t, gen, 0.01))
    os.rename(folder / "model.safetensors", folder / "adapter_model.safetensors")
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": LORA_RANK, "lora_alpha": 2 * LORA_RANK, "lora_dropout": 0.0,
        "target_modules": [m.split(".")[-1] for m in PROJECTIONS], "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "modules_to_save": None, "base_model_name_or_path": str(base),
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))


def ensure(root: Path) -> tuple[Path, Path]:
    base, adapter = root / "synthetic-1b", root / "synthetic-1b-lora-r16"
    for folder, make in ((base, write_base), (adapter, lambda f: write_adapter(f, base))):
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
    base, adapter = ensure(parser.parse_args().root)
    print(base)
    print(adapter)
