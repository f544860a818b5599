"""What the benchmarks share: run a contender in its own process (wall time and its own peak RSS), warm
the page cache, save results."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


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


def synthetic_model_with_tokenizer(shape: str = "tinyllama-1.1b", layers: int | None = None) -> Path:
    """A synthetic Llama (scripts/make_synthetic.py; its adapter beside it) with the fixture tokenizer copied
    in (2048 tokens, the rest of the vocabulary unused). Both are made in child processes: the caller stays
    small."""
    def path_from(script: str, *args: str) -> str:
        done = subprocess.run([sys.executable, str(HERE / script), *args], check=True, capture_output=True, text=True)
        return done.stdout.split()[0 if script == "make_synthetic.py" else -1]

    base = Path(path_from("make_synthetic.py", "--shape", shape, *(("--layers", str(layers)) if layers else ())))
    tokenizer = Path(path_from("fixtures.py", "--path")) / "tokenizer"
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer / name).exists():
            shutil.copy2(tokenizer / name, base / name)
    return base
