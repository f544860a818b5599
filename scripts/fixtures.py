"""Builds the project's fixtures: a tokenizer and small models *trained* on local text, so quality figures
(perplexity, top-1 agreement) measure something. No model hub is reachable; everything comes from the
Python standard library's source files, with fixed seeds.

    python scripts/fixtures.py            build (or reuse) the fixtures and print their figures
    python scripts/fixtures.py --path     print only the fixture folder

Fixtures are cached under $WORKBENCH_HOME/fixtures/<hash of this file>, built once into a temporary
folder and renamed into place, under a lock so that parallel callers build them once.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import math
import os
import shutil
import sysconfig
import time
from pathlib import Path

import torch

SEED = 0
VOCAB_SIZE = 2048
SEQ_LEN = 128
BATCH = 16
# Special tokens: bos/eos/pad, ChatML's turn markers, and <|endoftext|> (transformers' Qwen2 tokenizer class
# adds it as unk when a vocabulary lacks it, past the model's vocab_size).
BOS, EOS, PAD, IM_START, IM_END, ENDOFTEXT = "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, IM_START, IM_END, ENDOFTEXT]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Sizes: heads and kv heads divisible by 2 (TP=2 is valid), intermediate_size a multiple of 128 and rows a
# multiple of 256 (llama.cpp K-quants). Llama is untied, Qwen2 ties its embeddings, so both cases exist.
ARCHITECTURES = {
    "llama": dict(
        model_type="llama", hidden_size=256, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False,
    ),
    "qwen2": dict(
        model_type="qwen2", hidden_size=256, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=True,
    ),
}
TRAIN_STEPS = 400
LORA_STEPS = 150
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHARD_SIZE = "3MB"  # several shards even for a tiny model, so sharded I/O is always exercised


def workbench_home() -> Path:
    return Path(os.environ.get("WORKBENCH_HOME", Path.home() / ".cache" / "workbench"))


def fixture_dir() -> Path:
    key = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]
    return workbench_home() / "fixtures" / key


# ---------------------------------------------------------------- text

def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus(split: str) -> str:
    """Deterministic text splits of the standard library: 'train' and 'heldout' are disjoint sets of
    top-level modules' source; 'adapter' is another domain, English prose (pydoc's topic help texts)."""
    if split == "adapter":
        from pydoc_data.topics import topics

        return "\n\n".join(topics[k] for k in sorted(topics))
    lib = _stdlib()
    top = sorted(lib.glob("*.py"))
    files = [f for f in top if (int(hashlib.md5(f.name.encode()).hexdigest(), 16) % 10 == 0) == (split == "heldout")]
    if not files:
        raise SystemExit(f"no standard library sources found under {lib}")
    return "\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)


# ---------------------------------------------------------------- tokenizer

# Qwen2's split pattern: transformers' Qwen2 tokenizer class imposes it (with NFC, and no BOS) whatever
# tokenizer.json says, so the Qwen2 fixture is trained with it, as real Qwen2 checkpoints are.
QWEN2_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


def build_tokenizer(out: Path, flavor: str = "gpt2"):
    """Byte-level BPE: 'gpt2' (GPT-2 split regex, adds BOS, the Llama fixture) or 'qwen2' (Qwen2 split regex,
    NFC, no BOS)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if flavor == "qwen2":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus("train").splitlines(), trainer=trainer)
    if flavor == "gpt2":
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END], unk_token=ENDOFTEXT, model_max_length=512,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def token_blocks(tokenizer, text: str, limit: int | None = None) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = len(ids) // SEQ_LEN
    blocks = torch.tensor(ids[: n * SEQ_LEN]).view(n, SEQ_LEN)
    return blocks[:limit] if limit else blocks


# ---------------------------------------------------------------- models

def model_config(arch: str, tokenizer):
    from transformers import AutoConfig

    spec = dict(ARCHITECTURES[arch])
    return AutoConfig.for_model(
        spec.pop("model_type"), vocab_size=len(tokenizer), max_position_embeddings=512, rope_theta=10000.0,
        rms_norm_eps=1e-5, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **spec,
    )


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor) -> float:
    model.eval()
    total, count = 0.0, 0
    for batch in blocks.split(BATCH):
        loss = model(input_ids=batch, labels=batch).loss
        total += float(loss) * batch.numel()
        count += batch.numel()
    return math.exp(total / count)


def train(model, blocks: torch.Tensor, steps: int, lr: float) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    gen = torch.Generator().manual_seed(SEED)
    model.train()
    for step in range(steps):
        batch = blocks[torch.randint(0, len(blocks), (BATCH,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            print(f"  step {step:4d} loss {loss.item():.3f}", flush=True)


def build_model(arch: str, tokenizer, out: Path) -> dict:
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(model_config(arch, tokenizer), dtype=torch.float32)
    heldout = token_blocks(tokenizer, corpus("heldout"), limit=64)
    before = perplexity(model, heldout)
    print(f"{arch}: training {TRAIN_STEPS} steps", flush=True)
    train(model, token_blocks(tokenizer, corpus("train")), TRAIN_STEPS, lr=3e-3)
    after = perplexity(model, heldout)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(IM_END)],
        pad_token_id=tokenizer.pad_token_id, do_sample=False, max_new_tokens=64,
    )
    model.to(torch.bfloat16).save_pretrained(out, max_shard_size=SHARD_SIZE)
    tokenizer.save_pretrained(out)
    figures = {"uniform_ppl": len(tokenizer), "heldout_ppl_untrained": round(before, 2), "heldout_ppl_trained_fp32": round(after, 2)}
    print(f"{arch}: held-out perplexity {after:.2f} (untrained {before:.1f}, uniform {len(tokenizer)})", flush=True)
    return figures


def build_lora(base: Path, tokenizer, out: Path) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    text = corpus("adapter")
    split = int(len(text) * 0.9)
    train_blocks, eval_blocks = token_blocks(tokenizer, text[:split]), token_blocks(tokenizer, text[split:], limit=64)
    before = perplexity(model, eval_blocks)
    print(f"lora: training {LORA_STEPS} steps on the adapter domain", flush=True)
    train(model, train_blocks, LORA_STEPS, lr=5e-3)
    after = perplexity(model, eval_blocks)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)  # training runs save their tokenizer beside the adapter
    print(f"lora: adapter-domain perplexity {before:.2f} -> {after:.2f}", flush=True)
    return {"adapter_domain_ppl_base": round(before, 2), "adapter_domain_ppl_with_lora": round(after, 2)}


def build(root: Path) -> None:
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    t0 = time.time()
    tokenizer = build_tokenizer(root / "tokenizer")
    figures = {"llama": build_model("llama", tokenizer, root / "llama")}
    figures["qwen2"] = build_model("qwen2", build_tokenizer(root / "tokenizer-qwen2", "qwen2"), root / "qwen2")
    figures["lora"] = build_lora(root / "llama", tokenizer, root / "llama-lora")
    (root / "heldout.txt").write_text(corpus("heldout"))
    (root / "adapter-heldout.txt").write_text(corpus("adapter")[int(len(corpus("adapter")) * 0.9):])
    figures["build_seconds"] = round(time.time() - t0, 1)
    (root / "figures.json").write_text(json.dumps(figures, indent=2) + "\n")


def ensure_fixtures() -> Path:
    """The fixture folder, built on first use."""
    return build_once(fixture_dir(), build)


def build_once(final: Path, builder) -> Path:
    """``final``, made by ``builder(tmp)`` into a temporary folder renamed into place, under a lock so that
    parallel callers build it once; a folder with figures.json is complete."""
    if (final / "figures.json").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f"{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / "figures.json").exists():
            return final
        tmp = final.parent / f"{final.name}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            builder(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        os.rename(tmp, final)
    return final


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", action="store_true", help="print only the fixture folder")
    args = parser.parse_args()
    root = ensure_fixtures()
    if args.path:
        print(root)
        return
    print(f"fixtures: {root}")
    print((root / "figures.json").read_text(), end="")


if __name__ == "__main__":
    main()
