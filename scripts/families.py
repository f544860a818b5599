"""Config-faithful tiny models of the families users fine-tune (issue 13), trained locally like the main
fixtures (scripts/fixtures.py: same text, seeds and training loop) so that their logits mean something:
each family's real config fields (rope scaling, tied embeddings, head_dim, ...) at small sizes, with the
right kind of tokenizer trained here and the family's chat template and special tokens.

    python scripts/families.py FAMILY|all [--path]      build (or reuse) a family's model and print its folder

Each family is built on first use into $WORKBENCH_HOME/fixtures/families-<hash of this file and
fixtures.py>/<family>, under a lock, and renamed into place when complete.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixtures  # noqa: E402

STEPS = 300
# Llama 3's pre-tokenizer split (llama.cpp calls it llama-bpe): digits in groups of up to three
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# Mistral v0.3's template without tools: [INST] turns, the reply closed by eos
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + '[/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)

GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\\n' + message['content'] + '<|end|>\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# LongRoPE factors per rotary pair (head_dim 32: 16 each), shaped as Phi-3.5's: short ones near 1, long ones
# rising to ~the context ratio (32) for the lowest frequencies
PHI35_FACTORS = dict(short_factor=[round(1.0 + 0.5 * (i / 15) ** 2, 4) for i in range(16)],
                     long_factor=[round(1.0 + 31.0 * (i / 15) ** 2, 4) for i in range(16)])

# Qwen3's template without tools or thinking: ChatML turns
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Qwen2.5's: ChatML with its default system turn when the conversation brings none
QWEN25_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}" + CHATML_TEMPLATE
)
# Mixtral-8x7B-Instruct-v0.1's: [INST] as plain text (not special tokens in Llama 2's vocabulary), eos after replies
MIXTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)
# Gemma 3's: Gemma 2's turns, a system message folded into the first user turn
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% set first = '' %}"
    "{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\\n\\n' %}"
    "{% set messages = messages[1:] %}{% endif %}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + (first if loop.first else '') + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
# byte-level BPE split patterns by tokenizer kind, and whether it is NFC-normalized (Qwen's is)
BPE_KINDS = {"llama-bpe": (LLAMA3_PATTERN, False), "qwen2": (fixtures.QWEN2_PATTERN, True)}


@dataclass(frozen=True)
class Family:
    config: dict  # transformers config fields (model_type first), sizes small, the rest as the real models
    tokenizer: str  # a byte-level BPE kind of BPE_KINDS (tokenizers) or "spm" (SentencePiece BPE with byte fallback)
    bos: str | None  # None: the tokenizer adds no BOS (Qwen)
    eos: str
    specials: list[str]  # every special token, in id order after the learned vocabulary's first ids
    chat_template: str
    generation_eos: list[str] = field(default_factory=list)  # generation_config's eos_token_id list
    # SentencePiece: the trainer's ids of the reserved pieces (named by ``specials`` in id order), whether it
    # adds a dummy prefix ("▁" before the text), and the transformers tokenizer class
    spm: dict = field(default_factory=dict)
    added: list[str] = field(default_factory=list)  # special tokens added after the learned vocabulary (Phi-3's)
    pad: str | None = None  # the pad token, when not one of the reserved pieces
    vocab_multiple: int = 1  # the embedding's rows rounded up to this (Phi-3: 32064 for 32011 tokens)
    train_config: dict = field(default_factory=dict)  # config fields set while training only
    # config.json fields renamed after saving, as the real checkpoints name them (transformers 5 writes its
    # attribute's name: num_local_experts where Qwen3-MoE's config.json says num_experts)
    saved_names: dict = field(default_factory=dict)
    # config.json fields set and removed after saving, where the released checkpoints carry the layout
    # transformers 4 wrote (Gemma 3: rope_theta and rope_local_base_freq, no rope_parameters)
    saved_fields: dict = field(default_factory=dict)
    saved_dropped: tuple[str, ...] = ()


FAMILIES = {
    # Llama 3.2 1B's shape rules: tied embeddings, 4 query heads per KV head, rope theta 500000 with llama3
    # scaling (factor 32, original context 8192), an eos list in generation_config
    "llama-3.2": Family(
        config=dict(model_type="llama", hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=8,
                    num_key_value_heads=2, tie_word_embeddings=True, rope_theta=500000.0, max_position_embeddings=131072,
                    rms_norm_eps=1e-5, rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
        tokenizer="llama-bpe", bos="<|begin_of_text|>", eos="<|end_of_text|>",
        specials=["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>"],
        chat_template=LLAMA3_CHAT_TEMPLATE, generation_eos=["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
    ),
    # Mistral 7B v0.3's shape rules: untied, 4 query heads per KV head, head_dim set, rope theta 1e6, no
    # sliding window; a SentencePiece BPE tokenizer with byte fallback, digits split, a dummy prefix, and
    # control tokens after <unk> <s> </s>
    "mistral-v0.3": Family(
        config=dict(model_type="mistral", hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=8,
                    num_key_value_heads=2, head_dim=32, tie_word_embeddings=False, rope_theta=1000000.0,
                    max_position_embeddings=32768, sliding_window=None, rms_norm_eps=1e-5),
        tokenizer="spm", bos="<s>", eos="</s>",
        specials=["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                  "[TOOL_RESULTS]", "[/TOOL_RESULTS]"],
        chat_template=MISTRAL_CHAT_TEMPLATE,
        spm=dict(ids=dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1), add_dummy_prefix=True, tokenizer_class="LlamaTokenizer"),
    ),
    # Gemma 2 2B's shape rules: head_dim (64) apart from hidden/heads (32), query scaled by head_dim, logit
    # softcapping of attention (50) and output (30), sliding-window layers alternating with global ones
    # (window 64 here, so the 128-token test blocks use it), tied, GELU-tanh, norms stored as weight - 1;
    # SentencePiece without a dummy prefix, <pad> <eos> <bos> <unk> first, turns closed by <end_of_turn>
    "gemma-2": Family(
        config=dict(model_type="gemma2", hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=8,
                    num_key_value_heads=4, head_dim=64, query_pre_attn_scalar=64, sliding_window=64,
                    attn_logit_softcapping=50.0, final_logit_softcapping=30.0, tie_word_embeddings=True,
                    max_position_embeddings=8192, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
                    hidden_act="gelu_pytorch_tanh"),  # both, as Gemma 2's config.json (SGLang reads hidden_act)
        tokenizer="spm", bos="<bos>", eos="<eos>",
        specials=["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"],
        chat_template=GEMMA_CHAT_TEMPLATE, generation_eos=["<eos>", "<end_of_turn>"],
        spm=dict(ids=dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3), add_dummy_prefix=False, tokenizer_class="GemmaTokenizer"),
    ),
    # Phi-3.5 mini's shape rules (Phi-3 mini 128k's too): fused qkv_proj and gate_up_proj, as many KV heads as
    # query heads, LongRoPE (long and short factors per rotary pair, 131072 positions over an original 4096:
    # prompts under 4096 use the short factors, scaled by the attention factor), a sliding window in the
    # config, untied; Llama 2's SentencePiece tokenizer with Phi-3's chat tokens added after it, <|endoftext|>
    # as eos, the embedding padded to a multiple of 64; config.json as released (rope_scaling "longrope")
    "phi-3.5-mini": Family(
        config=dict(model_type="phi3", hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=8,
                    num_key_value_heads=8, tie_word_embeddings=False, max_position_embeddings=131072,
                    original_max_position_embeddings=4096, sliding_window=262144, rms_norm_eps=1e-5,
                    rope_parameters=dict(rope_type="longrope", rope_theta=10000.0, **PHI35_FACTORS)),
        tokenizer="spm", bos="<s>", eos="<|endoftext|>", specials=["<unk>", "<s>", "</s>"],
        chat_template=PHI3_CHAT_TEMPLATE, generation_eos=["<|endoftext|>", "<|assistant|>", "<|end|>"],
        spm=dict(ids=dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1), add_dummy_prefix=True, tokenizer_class="LlamaTokenizer"),
        saved_fields=dict(rope_theta=10000.0, rope_scaling=dict(type="longrope", **PHI35_FACTORS)),
        saved_dropped=("rope_parameters",),
        added=["<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"], vocab_multiple=64, pad="<|endoftext|>",
    ),
    # Qwen3-30B-A3B's shape rules: every layer a MoE block (decoder_sparse_step 1, no mlp_only_layers), many
    # small experts (moe_intermediate_size well under intermediate_size) with top-k renormalized, head_dim
    # apart from hidden/heads, q/k norms, 8 query heads per KV head, untied, rope theta 1e6; Qwen's
    # byte-level BPE without BOS, ChatML. Trained with the router's load-balancing loss, as Qwen3-MoE was.
    "qwen3-moe": Family(
        config=dict(model_type="qwen3_moe", hidden_size=256, intermediate_size=768, moe_intermediate_size=96, num_experts=16,
                    num_experts_per_tok=4, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], num_hidden_layers=2,
                    num_attention_heads=16, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False,
                    rope_theta=1000000.0, max_position_embeddings=40960, rms_norm_eps=1e-6, router_aux_loss_coef=0.001),
        tokenizer="qwen2", bos=None, eos="<|im_end|>", specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        chat_template=CHATML_TEMPLATE, generation_eos=["<|im_end|>", "<|endoftext|>"], pad="<|endoftext|>",
        train_config=dict(output_router_logits=True), saved_names={"num_local_experts": "num_experts"},
    ),
    # Qwen2.5 1.5B's shape rules: q/k/v projections with bias, tied, 6 query heads per KV head (4 here), rope
    # theta 1e6, sliding window configured but off; Qwen's byte-level BPE without BOS, ChatML with a default
    # system turn
    "qwen2.5": Family(
        config=dict(model_type="qwen2", hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=8,
                    num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1000000.0, max_position_embeddings=32768,
                    use_sliding_window=False, sliding_window=32768, max_window_layers=21, rms_norm_eps=1e-6),
        tokenizer="qwen2", bos=None, eos="<|im_end|>", specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        chat_template=QWEN25_CHAT_TEMPLATE, generation_eos=["<|im_end|>", "<|endoftext|>"], pad="<|endoftext|>",
    ),
    # Qwen3 0.6B's shape rules: head_dim (64 here, 128 there) apart from hidden/heads, q/k RMS norms, no
    # attention bias, tied, 2 query heads per KV head, rope theta 1e6
    "qwen3": Family(
        config=dict(model_type="qwen3", hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=8,
                    num_key_value_heads=4, head_dim=64, attention_bias=False, tie_word_embeddings=True,
                    rope_theta=1000000.0, max_position_embeddings=40960, rms_norm_eps=1e-6),
        tokenizer="qwen2", bos=None, eos="<|im_end|>", specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        chat_template=CHATML_TEMPLATE, generation_eos=["<|im_end|>", "<|endoftext|>"], pad="<|endoftext|>",
    ),
    # Mixtral 8x7B's shape rules: 8 experts top-2 of the full intermediate size in block_sparse_moe (w1/w3/w2),
    # 4 query heads per KV head, rope theta 1e6, untied, no sliding window; Llama 2's SentencePiece tokenizer
    # (<unk> <s> </s> only: [INST] is text), trained with the router's load-balancing loss
    "mixtral": Family(
        config=dict(model_type="mixtral", hidden_size=256, intermediate_size=384, num_local_experts=8, num_experts_per_tok=2,
                    num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False,
                    rope_theta=1000000.0, max_position_embeddings=32768, sliding_window=None, rms_norm_eps=1e-5,
                    router_aux_loss_coef=0.02),
        tokenizer="spm", bos="<s>", eos="</s>", specials=["<unk>", "<s>", "</s>"], chat_template=MIXTRAL_CHAT_TEMPLATE,
        spm=dict(ids=dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1), add_dummy_prefix=True, tokenizer_class="LlamaTokenizer"),
        train_config=dict(output_router_logits=True),
    ),
    # Gemma 3 1B's shape rules (Gemma3ForCausalLM, text only): five sliding-window layers per global one
    # (6 layers here, narrower than the others to train in the same time: one global), local rope theta 1e4
    # and global 1e6, q/k norms, one KV head, head_dim (64 here, 256 there) apart from hidden/heads, no
    # softcapping, norms stored as weight - 1, tied; config.json as released (rope_theta,
    # rope_local_base_freq, sliding_window_pattern); Gemma's SentencePiece
    "gemma-3": Family(
        config=dict(model_type="gemma3_text", hidden_size=128, intermediate_size=512, num_hidden_layers=6,
                    num_attention_heads=4, num_key_value_heads=1, head_dim=64, query_pre_attn_scalar=64, sliding_window=64,
                    tie_word_embeddings=True, max_position_embeddings=32768, rms_norm_eps=1e-6,
                    hidden_activation="gelu_pytorch_tanh"),
        tokenizer="spm", bos="<bos>", eos="<eos>",
        specials=["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"],
        chat_template=GEMMA3_CHAT_TEMPLATE, generation_eos=["<eos>", "<end_of_turn>"],
        spm=dict(ids=dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3), add_dummy_prefix=False, tokenizer_class="GemmaTokenizer"),
        saved_fields=dict(rope_theta=1000000.0, rope_local_base_freq=10000.0, rope_scaling=None, sliding_window_pattern=6),
        saved_dropped=("rope_parameters", "layer_types"),
    ),
}


def families_dir() -> Path:
    here = Path(__file__).resolve().parent
    key = hashlib.sha256(Path(__file__).read_bytes() + (here / "fixtures.py").read_bytes()).hexdigest()[:12]
    return fixtures.workbench_home() / "fixtures" / f"families-{key}"


def build_tokenizer(family: Family, out: Path):
    return (build_spm_tokenizer if family.tokenizer == "spm" else build_bpe_tokenizer)(family, out)


def build_spm_tokenizer(family: Family, out: Path):
    """Trained with the sentencepiece library as Llama 2, Mistral and Gemma were (BPE, byte fallback, split
    digits, whitespace-only pieces, no normalization); transformers converts tokenizer.model to its
    tokenizer.json."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    ids, prefix = family.spm["ids"], family.spm["add_dummy_prefix"]
    reserved = {key.removesuffix("_id"): family.specials[i] for key, i in ids.items() if i >= 0}
    control = family.specials[len(reserved):]
    lines = [line for line in fixtures.corpus("train").splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(out / "tokenizer"), vocab_size=fixtures.VOCAB_SIZE, model_type="bpe",
        byte_fallback=True, split_digits=True, add_dummy_prefix=prefix, allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", **ids,
        **{f"{role}_piece": piece for role, piece in reserved.items()}, control_symbols=control, character_coverage=0.9995,
        max_sentence_length=100000, num_threads=2, minloglevel=2)
    (out / "tokenizer.vocab").unlink()
    names = {**{f"{role}_token": piece for role, piece in reserved.items()}, "bos_token": family.bos, "eos_token": family.eos,
             **({"pad_token": family.pad} if family.pad else {})}
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": family.spm["tokenizer_class"], **names, "add_bos_token": True, "add_eos_token": False,
        "model_max_length": family.config["max_position_embeddings"]}))
    fast = AutoTokenizer.from_pretrained(out, additional_special_tokens=control + family.added)
    fast.chat_template = family.chat_template
    fast.save_pretrained(out)
    # as the real checkpoints ship them (converted by transformers 4): spaces become "▁" and, with a dummy
    # prefix, every piece of text, the first and each one after a special token, starts with "▁" (as
    # SentencePiece and llama.cpp do); transformers 5's own conversion prepends it to the first piece only
    pipeline = json.loads((out / "tokenizer.json").read_text())
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
    pipeline["normalizer"] = ({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"}, replace]}
                              if prefix else replace)
    pipeline["pre_tokenizer"] = None
    (out / "tokenizer.json").write_text(json.dumps(pipeline, ensure_ascii=False, indent=2) + "\n")
    # llama.cpp's converter reads added tokens and add_bos_token from tokenizer_config.json
    config = json.loads((out / "tokenizer_config.json").read_text())
    added = json.loads((out / "tokenizer.json").read_text())["added_tokens"]
    config["added_tokens_decoder"] = {str(t.pop("id")): t for t in added}
    config.update(add_bos_token=True, add_eos_token=False)
    config.pop("vocab_file", None)  # transformers 5 writes the build folder's absolute path here
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return fast


def build_bpe_tokenizer(family: Family, out: Path):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    pattern, nfc = BPE_KINDS[family.tokenizer]
    tok = Tokenizer(models.BPE())
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=fixtures.VOCAB_SIZE, special_tokens=family.specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(fixtures.corpus("train").splitlines(), trainer=trainer)
    if family.bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{family.bos} $A", pair=f"{family.bos} $A {family.bos} $B",
                                                           special_tokens=[(family.bos, tok.token_to_id(family.bos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=family.bos, eos_token=family.eos, pad_token=family.pad,
                                   additional_special_tokens=[s for s in family.specials if s not in (family.bos, family.eos, family.pad)],
                                   model_max_length=131072)
    fast.chat_template = family.chat_template
    fast.save_pretrained(out)
    return fast


def build(name: str, out: Path) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    family = FAMILIES[name]
    tokenizer = build_tokenizer(family, out)
    spec = dict(family.config)
    rows = -(-len(tokenizer) // family.vocab_multiple) * family.vocab_multiple
    config = AutoConfig.for_model(spec.pop("model_type"), vocab_size=rows, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **spec)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    torch.manual_seed(fixtures.SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    heldout = fixtures.token_blocks(tokenizer, fixtures.corpus("heldout"), limit=64)
    before = fixtures.perplexity(model, heldout)
    print(f"{name}: training {STEPS} steps", flush=True)
    saved = {key: getattr(model.config, key) for key in family.train_config}
    for key, value in family.train_config.items():
        setattr(model.config, key, value)
    fixtures.train(model, fixtures.token_blocks(tokenizer, fixtures.corpus("train")), STEPS, lr=3e-3)
    for key, value in saved.items():
        setattr(model.config, key, value)
    after = fixtures.perplexity(model, heldout)
    eos = [tokenizer.convert_tokens_to_ids(t) for t in family.generation_eos] or tokenizer.eos_token_id
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=eos, do_sample=False)
    model.to(torch.bfloat16).save_pretrained(out, max_shard_size=fixtures.SHARD_SIZE)
    if family.saved_names or family.saved_fields or family.saved_dropped:
        saved = json.loads((out / "config.json").read_text())
        saved = {family.saved_names.get(k, k): v for k, v in saved.items() if k not in family.saved_dropped}
        saved.update(family.saved_fields)
        (out / "config.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    figures = {"heldout_ppl_untrained": round(before, 2), "heldout_ppl_trained_fp32": round(after, 2), "uniform_ppl": len(tokenizer)}
    (out / "figures.json").write_text(json.dumps(figures, indent=2) + "\n")
    return figures


def ensure_family(name: str) -> Path:
    """The family's model folder, built on first use."""
    if name not in FAMILIES:
        raise SystemExit(f"unknown family {name!r}; known: {', '.join(FAMILIES)}")
    return fixtures.build_once(families_dir() / name, lambda tmp: build(name, tmp))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("family", choices=[*FAMILIES, "all"])
    parser.add_argument("--path", action="store_true", help="print only the folder")
    args = parser.parse_args()
    for name in FAMILIES if args.family == "all" else [args.family]:
        folder = ensure_family(name)
        print(folder if args.path else f"{name}: {folder}\n{(folder / 'figures.json').read_text()}", end="\n" if args.path else "", flush=True)


if __name__ == "__main__":
    main()
