"""What the GGUF converter knows about models and tokenizers, as data."""

from __future__ import annotations

from dataclasses import dataclass

import gguf

from ..errors import BadInput
from ..families import FAMILIES, GgufLayout


# the architectures the converter writes, with how llama.cpp names and reads each (families.GgufLayout)
CONVERTIBLE: dict[str, GgufLayout] = {name: f.gguf for name, f in FAMILIES.items() if f.gguf}


def gguf_arch(layout: GgufLayout) -> gguf.MODEL_ARCH:
    """gguf-py's architecture for a family's GGUF layout (``layout.arch`` by name)."""
    return gguf.MODEL_ARCH[layout.arch]


# GGML tensor types by lower-case name (--tensor-type, a release's tensor_types)
GGML_TYPES: dict[str, gguf.GGMLQuantizationType] = {t.name.lower(): t for t in gguf.GGMLQuantizationType}


def ggml_type(name: str, what: str) -> gguf.GGMLQuantizationType:
    """The GGML tensor type called ``name`` (any case); an unknown name is a BadInput naming ``what``."""
    if name.lower() not in GGML_TYPES:
        raise BadInput(f"{what}: unknown GGML type {name!r} (e.g. f16, q8_0, q6_k, q4_k)")
    return GGML_TYPES[name.lower()]

# tensors llama.cpp's converter always writes F32: MoE routers (llama.cpp computes the routing in F32)
FLOAT32_ROLES = ("ffn_gate_inp", "ffn_gate_inp_shexp")


@dataclass(frozen=True)
class OutType:
    """One GGUF outtype: llama.cpp's file type, its label in file names, and whether this converter writes it."""
    file_type: gguf.LlamaFileType
    label: str  # in the output name
    direct: bool  # written by this converter; otherwise llama.cpp's quantize makes it from F16
    needs_imatrix: bool = False  # llama.cpp refuses to make it without an importance matrix


OUTTYPES: dict[str, OutType] = {
    "f32": OutType(gguf.LlamaFileType.ALL_F32, "F32", True),
    "f16": OutType(gguf.LlamaFileType.MOSTLY_F16, "F16", True),
    "bf16": OutType(gguf.LlamaFileType.MOSTLY_BF16, "BF16", True),
    "q8_0": OutType(gguf.LlamaFileType.MOSTLY_Q8_0, "Q8_0", True),
    "q4_0": OutType(gguf.LlamaFileType.MOSTLY_Q4_0, "Q4_0", False),
    "q4_1": OutType(gguf.LlamaFileType.MOSTLY_Q4_1, "Q4_1", False),
    "q5_0": OutType(gguf.LlamaFileType.MOSTLY_Q5_0, "Q5_0", False),
    "q5_1": OutType(gguf.LlamaFileType.MOSTLY_Q5_1, "Q5_1", False),
    "q2_k": OutType(gguf.LlamaFileType.MOSTLY_Q2_K, "Q2_K", False),
    "q3_k_s": OutType(gguf.LlamaFileType.MOSTLY_Q3_K_S, "Q3_K_S", False),
    "q3_k_m": OutType(gguf.LlamaFileType.MOSTLY_Q3_K_M, "Q3_K_M", False),
    "q3_k_l": OutType(gguf.LlamaFileType.MOSTLY_Q3_K_L, "Q3_K_L", False),
    "q4_k_s": OutType(gguf.LlamaFileType.MOSTLY_Q4_K_S, "Q4_K_S", False),
    "q4_k_m": OutType(gguf.LlamaFileType.MOSTLY_Q4_K_M, "Q4_K_M", False),
    "q5_k_s": OutType(gguf.LlamaFileType.MOSTLY_Q5_K_S, "Q5_K_S", False),
    "q5_k_m": OutType(gguf.LlamaFileType.MOSTLY_Q5_K_M, "Q5_K_M", False),
    "q6_k": OutType(gguf.LlamaFileType.MOSTLY_Q6_K, "Q6_K", False),
    "iq4_nl": OutType(gguf.LlamaFileType.MOSTLY_IQ4_NL, "IQ4_NL", False),
    "iq4_xs": OutType(gguf.LlamaFileType.MOSTLY_IQ4_XS, "IQ4_XS", False),
    "iq3_s": OutType(gguf.LlamaFileType.MOSTLY_IQ3_S, "IQ3_S", False),
    "iq3_m": OutType(gguf.LlamaFileType.MOSTLY_IQ3_M, "IQ3_M", False),
    "iq3_xxs": OutType(gguf.LlamaFileType.MOSTLY_IQ3_XXS, "IQ3_XXS", False, needs_imatrix=True),
    "iq2_m": OutType(gguf.LlamaFileType.MOSTLY_IQ2_M, "IQ2_M", False, needs_imatrix=True),
    "iq2_s": OutType(gguf.LlamaFileType.MOSTLY_IQ2_S, "IQ2_S", False, needs_imatrix=True),
    "iq2_xs": OutType(gguf.LlamaFileType.MOSTLY_IQ2_XS, "IQ2_XS", False, needs_imatrix=True),
    "iq2_xxs": OutType(gguf.LlamaFileType.MOSTLY_IQ2_XXS, "IQ2_XXS", False, needs_imatrix=True),
    "iq1_m": OutType(gguf.LlamaFileType.MOSTLY_IQ1_M, "IQ1_M", False, needs_imatrix=True),
    "iq1_s": OutType(gguf.LlamaFileType.MOSTLY_IQ1_S, "IQ1_S", False, needs_imatrix=True),
}

# Byte-level BPE pre-tokenizer split patterns -> llama.cpp's pre-tokenizer name. llama.cpp's own converter
# recognises a tokenizer by hashing its output on a test text and refuses unknown ones; the regex itself
# is what decides the pre-tokenization, so it is matched here instead.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
PRE_TOKENIZERS = {
    GPT2_PATTERN: "gpt-2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
}
DEFAULT_PRE_TOKENIZER = "default"
# Texts llama.cpp must tokenize exactly as transformers before a pre-tokenizer it does not name is accepted.
TOKENIZER_PROBES = [
    "def f(x):\n    return x ** 2  # square\n",
    "Prices: 12345 and 3.14159, 1e-9; year 2026, phone 555-0100.",
    "Grüße, naïve café — 東京 and emoji 🙂 end",
    "if __name__ == '__main__':\n\tmain()\r\n\n\n   spaces   and\ttabs",
    "I'm sure they'll say it's OK, we've done THAT'S before.",
]
# ... and each after a special token, parsed as one (chat templates put text right after them)
SPECIAL_PROBES = ["Hello 12", " Hello"]
