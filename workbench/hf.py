"""transformers, quietly: its progress bars and advisory warnings go to stderr, where the workbench keeps
one line per error."""

from __future__ import annotations

import contextlib


def quiet_transformers() -> None:
    """Turn off transformers' progress bars and log only its errors."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer starts an encoded text with its BOS (as the engines encode prompts)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a").input_ids[:1] == [bos]


@contextlib.contextmanager
def torch_threads(n: int):
    """Run a block with ``n`` torch intra-op threads, restoring the previous count after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def library_logs_to_stderr(level: str) -> None:
    """loguru's messages (llm-compressor's and compressed-tensors') from ``level`` on to whatever ``sys.stderr``
    is when they are written: importing llm-compressor sends them to stdout, where ``--json``'s document goes."""
    import sys

    from loguru import logger

    logger.remove()
    logger.add(lambda message: sys.stderr.write(message), level=level, format="{time:HH:mm:ss} | {level} - {message}")
