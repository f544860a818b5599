"""The workbench's own folder ($WORKBENCH_HOME, default ~/.cache/workbench): engine environments, error logs,
remembered token ids of the embedded texts."""

from __future__ import annotations

import os
from pathlib import Path


def workbench_home() -> Path:
    return Path(os.environ.get("WORKBENCH_HOME", Path.home() / ".cache" / "workbench"))
