"""Calibration and evaluation text, shared by the verbs (quantize calibrates and reports on it, convert's
importance matrix calibrates on it, verify's read-back runs it): a local .txt / .jsonl / .parquet file, or the
embedded default (the Python standard library's source, which every machine has). Samples are windows of seq_len tokens drawn with a
seeded generator; the default evaluation text never overlaps the default calibration text."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import torch

from .errors import BadInput
from .hf import adds_bos
from .options import Calibration

EVALUATION_EVERY = 10  # every 10th standard-library module is evaluation text, the rest calibration text
EVALUATION_BLOCKS, EVALUATION_SEQ_LEN = 16, 256  # the quality report's held-out text: 4096 tokens
EVALUATION_TOKENS = EVALUATION_BLOCKS * EVALUATION_SEQ_LEN


def default_text(split: str) -> str:
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    chosen = [f for i, f in enumerate(files) if (i % EVALUATION_EVERY == 0) == (split == "evaluation")]
    return "\n".join(f.read_text(encoding="utf-8", errors="replace") for f in chosen)


def load_texts(data: str, field: str) -> list[str]:
    if data == "default":
        return [default_text("calibration")]
    path = Path(data)
    if not path.is_file():
        raise BadInput(f"calibration data not found: {path}")
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                texts.append(str(json.loads(line)[field]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise BadInput(f"calibration data {path}, line {n}: not a JSON object with a {field!r} field") from None
    elif path.suffix == ".txt":
        texts = [path.read_text(encoding="utf-8")]
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            texts = [str(t) for t in pq.read_table(path, columns=[field]).column(field).to_pylist() if t is not None]
        except (KeyError, ValueError, OSError) as exc:
            raise BadInput(f"calibration data {path}: no readable {field!r} column ({str(exc).splitlines()[0]})") from None
    else:
        raise BadInput(f"calibration data must be .txt, .jsonl or .parquet, got {path.name}")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise BadInput(f"calibration data is empty: {path}")
    return texts


def token_windows(tokenizer, texts: list[str], samples: int, seq_len: int, seed: int, chat_template: bool = False,
                  what: str = "calibration data") -> torch.Tensor:
    """``samples`` windows of ``seq_len`` tokens from the texts joined by EOS, at seeded random offsets; each
    starts with BOS when the tokenizer adds one (its activation outliers belong in the static scales)."""
    if chat_template:
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False) for t in texts]
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    if len(ids) < seq_len + 1:
        raise BadInput(f"{what} too short: {len(ids)} tokens, a sample needs {seq_len}")
    stream, bos = torch.tensor(ids), _bos(tokenizer)
    width = seq_len - len(bos)
    starts = torch.randint(0, len(ids) - width, (samples,), generator=torch.Generator().manual_seed(seed))
    return torch.stack([torch.cat([bos, stream[s:s + width]]) for s in starts.tolist()])


def _bos(tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer.bos_token_id] if adds_bos(tokenizer) else [], dtype=torch.long)


def calibration_samples(tokenizer, cal) -> torch.Tensor:
    """``cal``: the calibration settings (a recipe's, or the importance matrix's)."""
    return token_windows(tokenizer, load_texts(cal.data, cal.field), cal.samples, cal.seq_len, cal.seed, cal.chat_template)


def evaluation_blocks(tokenizer, blocks: int = EVALUATION_BLOCKS, seq_len: int = EVALUATION_SEQ_LEN) -> torch.Tensor:
    """Held-out text for the quality report: consecutive blocks of the default evaluation split, each
    starting with BOS when the tokenizer adds one."""
    ids = tokenizer(default_text("evaluation"), add_special_tokens=False).input_ids
    bos = _bos(tokenizer)
    width = seq_len - len(bos)
    n = min(blocks, len(ids) // width)
    return torch.cat([bos.expand(n, -1), torch.tensor(ids[: n * width]).view(n, width)], dim=1)
