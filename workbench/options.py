"""Option values the command line and the release file both accept, and the calibration settings: plain data
with no heavy import, so `workbench --help` and the release file's checks start without torch."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BadInput

CONFIG_DTYPE_NAMES = ("bfloat16", "float16", "float32")  # config.json's torch_dtype values the workbench computes in
MERGE_DTYPES = ("auto", "bf16", "fp16", "fp32")  # auto: the base's
BASE_QUANTS = ("auto", "none", "nf4", "fp4")  # how a QLoRA base is quantized back before the merge (lora._base_quant)
KV_CACHE_KINDS = ("fp8",)


@dataclass(frozen=True)
class Calibration:
    """Which calibration text, and how much of it (a recipe's calibration section, the imatrix options)."""

    data: str = "default"
    field: str = "text"
    samples: int = 128
    seq_len: int = 256
    seed: int = 0
    chat_template: bool = False


@dataclass(frozen=True)
class TensorTypes:
    """GGUF tensor types chosen over the file type's, as llama-quantize's --tensor-type, --output-tensor-type and
    --token-embedding-type choose them: GGML type names, lower-case (convert/plan.py checks them)."""

    patterns: tuple[tuple[str, str], ...] = ()  # (regular expression searched in the GGUF tensor name, type): first match
    output: str | None = None  # output.weight (token_embd.weight where the model ties them)
    token_embedding: str | None = None  # token_embd.weight

    def __bool__(self) -> bool:
        return bool(self.patterns or self.output or self.token_embedding)

    @classmethod
    def from_dict(cls, chosen: dict) -> "TensorTypes":
        """The inverse of as_dict (a release stage's options)."""
        return cls(tuple(tuple(p) for p in chosen.get("patterns", ())), chosen.get("output"), chosen.get("token_embedding"))

    def as_dict(self) -> dict:
        """For manifests and stage options: only what was chosen."""
        return {k: v for k, v in (("patterns", [list(p) for p in self.patterns]), ("output", self.output),
                                  ("token_embedding", self.token_embedding)) if v}


@dataclass(frozen=True)
class GgufOptions:
    """`convert gguf`'s settings besides its input, from the command line or a release's gguf stage."""

    outtypes: tuple[str, ...] = ("f16",)  # one file each
    out: Path | None = None  # a .gguf file (one outtype) or a folder; default: beside the model
    force: bool = False  # replace existing outputs
    llamacpp_python: str | None = None  # the llama.cpp engine's interpreter (default: its managed environment)
    imatrix: Calibration | None = None  # llama.cpp's importance matrix on this text, for its quantize types
    accept_tokenizer_difference: bool = False  # write a file whose tokenizer llama.cpp splits otherwise (recorded)
    tensor_types: TensorTypes = TensorTypes()
    split_max_size: int = 0  # bytes of tensor data per file of a split set (a folder per type); 0: one file


@dataclass(frozen=True)
class QuantizeOptions:
    """`quantize`'s settings besides its input, from the command line or a release's quantize stage
    (quantize/run.py): a method's default recipe or a recipe file, the keys set over it, the output, the gates."""

    method: str | None = None
    recipe_path: Path | None = None
    overrides: dict = field(default_factory=dict)  # recipe keys given on the command line (None: not given)
    out: Path | None = None  # default: beside the model, named after the recipe
    force: bool = False  # replace an existing output
    gates: dict = field(default_factory=dict)  # quality gates by name, over the recipe's


@dataclass(frozen=True)
class MergeOptions:
    """`merge`'s settings besides its inputs, from the command line or a release's merge stage (merge.merge)."""

    out: Path
    dtype: str = "auto"  # MERGE_DTYPES
    max_shard_bytes: int | None = None  # default: the base's largest file
    base_quant: str = "auto"  # BASE_QUANTS: how a QLoRA base is quantized back before the merge
    double_quant: bool = False
    force: bool = False  # replace an existing output


@dataclass(frozen=True)
class VerifyOptions:
    """Everything `verify` takes besides the artifact, built once by the command line or by a release's verify
    stage and passed whole (verify/run.py reads it)."""

    engine: str
    tps: list[int] = field(default_factory=lambda: [1])  # each served in turn
    pp: int = 1
    dp: int = 1
    nodes: int = 1  # > 1: each layout over that many local nodes (the engine's multi-node path)
    python: str | None = None  # the engine's interpreter (default: its managed environment)
    reference: Path | None = None  # what the artifact is compared with (default: verify's own choice)
    no_reference: bool = False
    report_dir: Path | None = None
    ready_timeout: float = 600.0
    max_model_len: int | None = None
    dtype: str | None = None  # given to the engine, and the reference's dtype (default: the checkpoint's)
    extra_args: tuple[str, ...] = ()  # more engine flags; one given replaces the workbench's default for it
    port: int | None = None
    force: bool = False  # start a TP size the preflight refuses
    marlin: bool = True  # the preflight counts Marlin's tile rules (GPTQ/AWQ on a GPU)
    gates: dict = field(default_factory=dict)  # verify gates by name, over the artifact kind's defaults
    prompts: tuple[str, ...] = ()  # instead of the default probe prompts
    max_tokens: int | None = None
    groups_file: Path | None = None  # each engine's guard appends its process group id here
    adapters: tuple[str, ...] = ()  # NAME=PATH LoRA adapters served unmerged, each compared with peft
    concurrency: int = 8  # concurrent requests of the concurrency check (0: not run)
    evals: tuple[str, ...] = ()  # lm-eval tasks on the artifact and on its source served the same way
    eval_limit: int | None = None  # documents per task


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B?|B)?\s*$", re.I)
# 2G as llama.cpp's gguf-split reads it: powers of 1000, as 2GB
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30, "k": 10**3, "m": 10**6,
          "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}


def parse_size(value: str | int | None) -> int | None:
    """A shard or split size: bytes, or a string like 500MB, 2GB, 1.5GiB, 45G (None stays None)."""
    if value is None or isinstance(value, int):
        return value
    m = _SIZE.match(value)
    if not m:
        raise BadInput(f"{value!r} is not a size like 500MB, 2GB or 45G")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()])
