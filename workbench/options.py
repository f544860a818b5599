"""Option values the command line and the release file both accept, and the calibration settings: plain data
with no heavy import, so `workbench --help` and the release file's checks start without torch."""

from __future__ import annotations

import re
from dataclasses import dataclass

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


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*$", re.I)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(value: str | int | None) -> int | None:
    """A shard size: bytes, or a string like 500MB, 2GB, 1.5GiB."""
    if value is None or isinstance(value, int):
        return value
    m = _SIZE.match(value)
    if not m:
        raise BadInput(f"{value!r} is not a size like 500MB or 2GB")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()])
