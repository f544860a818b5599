"""The tokenizer as llama.cpp reads it, from the model folder's tokenizer as transformers loads it: byte-level
BPE from tokenizer.json, SentencePiece from tokenizer.model plus transformers' added tokens."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import gguf

from ..errors import BadInput
from ..hf import adds_bos, quiet_transformers
from ..safety import remote_code_trusted
from .gguf_tables import DEFAULT_PRE_TOKENIZER, GPT2_PATTERN, PRE_TOKENIZERS, TOKENIZER_PROBES


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


def read_vocab(model_dir: Path, vocab_size: int) -> Vocab:
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
