"""transformers, quietly: its progress bars and advisory warnings go to stderr, where the workbench keeps
one line per error."""

from __future__ import annotations


def quiet_transformers() -> None:
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()
