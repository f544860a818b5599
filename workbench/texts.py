"""Calibration and evaluation text, shared by the verbs (quantize calibrates and reports on it, convert's
importance matrix calibrates on it, verify's read-back runs it): a local .txt / .jsonl / .parquet file, or the
embedded default (the Python standard library's source, which every machine has). Samples are windows of seq_len tokens drawn with a
seeded generator; the default evaluation text never overlaps the default calibration text."""

from __future__ import annotations

import hashlib
import json
import sysconfig
from pathlib import Path

import torch

from .checkpoint import replace_file
from .errors import BadInput
from .hf import adds_bos
from .home import workbench_home
from .options import Calibration

EVALUATION_EVERY = 10  # every 10th standard-library module is evaluation text, the rest calibration text
EVALUATION_BLOCKS, EVALUATION_SEQ_LEN = 16, 256  # the quality report's held-out text: 4096 tokens
EVALUATION_TOKENS = EVALUATION_BLOCKS * EVALUATION_SEQ_LEN


def default_text(split: str) -> str:
    """The embedded default text: the standard library's top-level modules, every tenth one for the
    "evaluation" split, the others for any other split (calibration), joined."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    chosen = [f for i, f in enumerate(files) if (i % EVALUATION_EVERY == 0) == (split == "evaluation")]
    return "\n".join(f.read_text(encoding="utf-8", errors="replace") for f in chosen)


def load_texts(data: str, field: str) -> list[str]:
    """The non-empty texts of the calibration data ``data``: the embedded default's calibration text, a .txt
    file (one text), or the ``field`` of each .jsonl line or .parquet row; a missing file, another suffix, a record
    without ``field`` or no text at all is a BadInput."""
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


def token_ids(tokenizer, text: str, remember: bool = False) -> list[int]:
    """``text``'s token ids without special tokens. ``remember``: kept under $WORKBENCH_HOME/cache/tokens, keyed
    by the text and the tokenizer's whole definition, for the embedded default texts (tokenizing the 4 MB
    calibration split took 5.5 s of every quantize here, for the same ids each time)."""
    key = _tokens_key(tokenizer, text) if remember else None
    path = workbench_home() / "cache" / "tokens" / f"{key}.json" if key else None
    if path is not None and path.is_file():
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            pass  # unreadable (a full disk when it was written): tokenized again below, and rewritten
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            replace_file(path, json.dumps(ids))  # whole or absent, also with two runs writing it at once
        except OSError:
            pass  # a read-only or full home: the ids are still right, only not remembered
    return ids


def _tokens_key(tokenizer, text: str) -> str | None:
    """The text's and the tokenizer's digest (its tokenizer.json as loaded, its class, transformers' version), or
    None for a tokenizer without one (a Python-only tokenizer: not remembered)."""
    import transformers

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    h = hashlib.sha256()
    for part in (text, backend.to_str(), type(tokenizer).__name__, transformers.__version__):
        h.update(part.encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()[:32]


def token_windows(tokenizer, texts: list[str], samples: int, seq_len: int, seed: int, chat_template: bool = False,
                  what: str = "calibration data", remember: bool = False) -> torch.Tensor:
    """``samples`` windows of ``seq_len`` tokens from the texts joined by EOS, at seeded random offsets; each
    starts with BOS when the tokenizer adds one (its activation outliers belong in the static scales).
    ``remember``: the texts' token ids are kept (token_ids)."""
    if chat_template:
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False) for t in texts]
    ids: list[int] = []
    for text in texts:
        ids += token_ids(tokenizer, text, remember) + [tokenizer.eos_token_id]
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
    return token_windows(tokenizer, load_texts(cal.data, cal.field), cal.samples, cal.seq_len, cal.seed, cal.chat_template,
                         remember=cal.data == "default")


def evaluation_blocks(tokenizer, blocks: int = EVALUATION_BLOCKS, seq_len: int = EVALUATION_SEQ_LEN) -> torch.Tensor:
    """Held-out text for the quality report: consecutive blocks of the default evaluation split, each
    starting with BOS when the tokenizer adds one."""
    ids = token_ids(tokenizer, default_text("evaluation"), remember=True)
    bos = _bos(tokenizer)
    width = seq_len - len(bos)
    n = min(blocks, len(ids) // width)
    return torch.cat([bos.expand(n, -1), torch.tensor(ids[: n * width]).view(n, width)], dim=1)
