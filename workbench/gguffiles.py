"""Which files make up a GGUF model: one ``.gguf`` file, or a split set named as llama.cpp names it
(``NAME-00001-of-00003.gguf`` ...), which llama.cpp loads from its first part. The workbench writes a split set
into a folder of its own, so that it appears whole or not at all; a first part named directly stands for its set."""

from __future__ import annotations

import re
from pathlib import Path

from .errors import BadInput

# llama.cpp's split names (llama_split_path: "%s-%05d-of-%05d.gguf"), as gguf-py's writer makes them too
SPLIT_NAME = re.compile(r"^(?P<stem>.+)-(?P<part>\d{5})-of-(?P<count>\d{5})\.gguf$")


def is_gguf_set(path: Path) -> bool:
    """A .gguf file, or a folder that holds GGUF files and no config.json (a split set the workbench wrote)."""
    if path.is_file():
        return path.suffix == ".gguf"
    return path.is_dir() and not (path / "config.json").exists() and any(path.glob("*.gguf"))


def gguf_parts(path: Path) -> list[Path]:
    """The files llama.cpp loads for ``path``, in order: a plain .gguf file alone; a split part's whole set (every
    part present); a folder's one set (or its one plain .gguf file). Anything else is bad input."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.gguf"))
        firsts = [f for f in files if (m := SPLIT_NAME.match(f.name)) and int(m["part"]) == 1]
        if len(firsts) == 1:
            return gguf_parts(firsts[0])
        if len(files) == 1 and not firsts:
            return files
        raise BadInput(f"{path} holds {len(files)} .gguf files, not one file or one split set")
    match = SPLIT_NAME.match(path.name)
    if not match:
        return [path]
    count = int(match["count"])
    parts = [path.with_name(f"{match['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise BadInput(f"split GGUF {path.name}: {len(missing)} of its {count} parts missing ({missing[0]})")
    return parts


def gguf_entry(path: Path) -> Path:
    """The file llama.cpp is given for ``path``: its first part."""
    return gguf_parts(path)[0]
