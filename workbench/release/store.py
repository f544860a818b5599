"""The release store: a folder every node reads, holding each finished stage's output under its stage key.

A stage key is the sha256 of the stage's inputs' content, options and tool versions (release/run.py), so an
entry is valid for any machine that computes the same key: a job that built a stage on one node puts it here,
a job on another node (or the gathering run) takes it instead of building it again. Layout:

    <store>/<key>/result.json      how the stage ended (action, error, exit code, seconds, the node's engine version)
    <store>/<key>/files/<name>     its output as the stage wrote it (a folder, or a .gguf and its sidecar manifest)
    <store>/<key>/log              the stage's log
    <store>/stages/<release>/<stage id>.json   the key the latest job recorded for that stage (for --gather)

Entries are written into a temporary folder and renamed into place; reading puts files (links are refused:
the store may be written by other machines) at a temporary name beside the destination, then renames. Files
are hard links where the store and the outputs share a filesystem (no second copy of the weights; the
workbench never rewrites a file in place, it replaces it by rename), copies elsewhere.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path

from ..checkpoint import replace_file
from ..outputs import remove_path, rename_into_place
from ..errors import BadInput
from ..safety import check_name

KEY = re.compile(r"[0-9a-f]{64}")
RESULT = "result.json"


class Store:
    """The release store at ``root``: each finished stage's outputs, result and log under its stage key, and the
    key each release's stage last recorded (the module's docstring gives the layout)."""
    def __init__(self, root: Path):
        self.root = Path(root).absolute()

    def _entry(self, key: str) -> Path:
        if not KEY.fullmatch(key or ""):
            raise BadInput(f"not a stage key: {key!r}")
        return self.root / key

    def result(self, key: str) -> dict | None:
        """The recorded end of the stage with this key, or None when the store has no whole entry."""
        try:
            return json.loads((self._entry(key) / RESULT).read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def put(self, key: str, outputs: list[Path], result: dict, log: Path | None, pointer: tuple[str, str]) -> None:
        """Record a finished stage: its outputs (those that exist), its result and log; then point the
        release's stage id at the key. An entry already there for the key is replaced."""
        self.root.mkdir(parents=True, exist_ok=True)
        staging = self.root / f".partial-{uuid.uuid4().hex}"
        (staging / "files").mkdir(parents=True)
        try:
            for path in outputs:
                if path.exists():
                    _copy(path, staging / "files" / path.name)
            if log is not None and log.is_file():
                shutil.copyfile(log, staging / "log")
            (staging / RESULT).write_text(json.dumps(result, indent=2) + "\n")
            rename_into_place(staging, self._entry(key), force=True)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        release, stage_id = pointer
        folder = self.root / "stages" / check_name(release, "release name")
        folder.mkdir(parents=True, exist_ok=True)
        replace_file(folder / f"{check_name(stage_id, 'stage id')}.json",
                     json.dumps({"key": key, "engine_version": result.get("engine_version")}) + "\n")

    def pointer(self, release: str, stage_id: str) -> dict | None:
        """What the latest job recorded for a release's stage: {"key", "engine_version"}, or None."""
        try:
            return json.loads((self.root / "stages" / release / f"{stage_id}.json").read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def fetch(self, key: str, outputs: list[Path], log: Path | None = None) -> bool:
        """Copy the entry's outputs to their places (in the order given: a .gguf's sidecar manifest before the
        file, as the converter writes them); False when the entry holds none of them."""
        files = self._entry(key) / "files"
        present = [p for p in outputs if os.path.lexists(files / p.name)]
        if not present:
            return False
        for path in present:
            path.parent.mkdir(parents=True, exist_ok=True)
            staging = path.with_name(f".{path.name}.fetch-{uuid.uuid4().hex[:8]}")
            try:
                _copy(files / path.name, staging)
                rename_into_place(staging, path, force=True)
            finally:
                remove_path(staging)
        if log is not None and (self._entry(key) / "log").is_file():
            log.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self._entry(key) / "log", log)
        return True


def _copy(source: Path, target: Path) -> None:
    """Regular files and folders only: a link in the store could point anywhere. A file is hard-linked, or
    copied where it cannot be (another filesystem, a filesystem without links)."""
    if source.is_symlink() or not (source.is_file() or source.is_dir()):
        raise BadInput(f"store entry {source} is not a regular file or folder: not copying it")
    if source.is_file():
        try:
            os.link(source, target)
        except OSError:
            shutil.copyfile(source, target)
        return
    target.mkdir()
    for child in source.iterdir():
        _copy(child, target / child.name)
