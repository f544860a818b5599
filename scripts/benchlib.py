"""What the benchmarks share: run a contender in its own process (wall time and its own peak RSS), warm
the page cache, save results."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path


def measure(argv: list[str]) -> dict:
    """Wall time and peak RSS (ru_maxrss of that child alone) of one command. The caller should not hold
    much memory itself: a forked child's ru_maxrss starts at the parent's resident size."""
    os.sync()  # no contender pays for the previous one's writeback
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if status != 0:
        raise SystemExit(f"failed: {' '.join(argv)}\n{proc.stderr.read().decode()[-2000:]}")
    return {"seconds": round(seconds, 2), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def warm(*folders: Path) -> None:
    """Read every file once, so each contender starts with its inputs in the page cache."""
    for folder in folders:
        for p in folder.iterdir():
            if p.is_file():
                with open(p, "rb") as f:
                    while f.read(1 << 24):
                        pass


def save(path: Path | None, summary: dict) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2) + "\n")
