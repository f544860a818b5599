"""The workbench's own folder ($WORKBENCH_HOME, default ~/.cache/workbench): engine environments, error logs,
remembered token ids of the embedded texts."""

from __future__ import annotations

import os
from pathlib import Path


def workbench_home() -> Path:
    """The workbench's own folder: $WORKBENCH_HOME, else ~/.cache/workbench (not created here)."""
    return Path(os.environ.get("WORKBENCH_HOME", Path.home() / ".cache" / "workbench"))
