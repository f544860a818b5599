"""What a release knows about its stages between runs: each stage's key (what it was made from), the key
recorded with a finished output, an artifact's digest, and the result of a stage in this run. Read by the
runner (run.py), the store's users and the publisher (publish.py), which import this and not each other."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..engines import ENGINES, engine_python, engine_version
from ..errors import BadInput
from ..manifest import folder_digest, last_step, manifest_path, read_manifest, tool_versions
from .kinds import KINDS, MARKER
from .spec import SOURCE, UNMERGED, Release, Stage

CARD = "README.md"


@dataclass
class StageResult:
    """How one stage ended in this run: its action, output, key, seconds, error, exit code and log."""
    id: str
    kind: str
    action: str  # built | cached | fetched (from the store) | failed | incomplete | blocked
    output: str
    key: str | None = None
    seconds: float = 0.0
    error: str | None = None
    exit_code: int = 0
    log: str | None = None


class Keys:
    """Stage keys. Inputs are identified by content: the source folders' sha256 (each file's digest cached by
    its stat, so asking again is cheap and sees a change), an artifact's files as listed in its manifest
    (the model card excluded: it is rewritten every run)."""

    def __init__(self, release: Release, pinned_engines: dict[str, str | None] | None = None):
        self.release = release
        self._engines: dict[str, str | None] = {}
        self.versions = tool_versions()
        # verify stage id -> the engine version the job that ran it recorded (--gather serves nothing itself)
        self.pinned_engines = pinned_engines or {}

    def source_digest(self, which: str) -> str:
        """The sha256 of the "base" or "adapter" folder, after its hub repository and commit for a hub snapshot; a
        missing folder is a BadInput."""
        path = self.release.base if which == "base" else self.release.adapter
        if not path.is_dir():
            raise BadInput(f"{which} not found: {path}")
        digest = folder_digest(path)
        hub = digest.get("hub")  # a hub snapshot: its repository and commit are part of the key
        return digest["sha256"] if hub is None else f"{hub['repo_id']}@{hub['commit']}:{digest['sha256']}"

    def sources_read(self, stage: Stage) -> dict[str, str]:
        """The digests of the source folders a stage reads (which must not change while it runs)."""
        reads = set(KINDS[stage.kind].reads_sources)
        reads |= {which for which, need in (("base", SOURCE), ("adapter", UNMERGED)) if need in stage.needs}
        return {which: self.source_digest(which) for which in sorted(reads)}

    def engine(self, name: str) -> str | None:
        """The installed version of engine ``name``, asked of its Python once and then kept; None when it cannot say."""
        if name not in self._engines:
            self._engines[name] = engine_version(ENGINES[name], engine_python(ENGINES[name]))
        return self._engines[name]

    def engine_of(self, stage: Stage) -> str | None:
        """The engine version of a verify stage: the one its job recorded when pinned (gathering), else ``engine``'s."""
        name = stage.options["engine"]
        if stage.id in self.pinned_engines:
            self._engines.setdefault(name, self.pinned_engines[stage.id])
            return self.pinned_engines[stage.id]
        return self.engine(name)

    @property
    def engine_versions(self) -> dict[str, str | None]:
        """The engine versions asked or pinned so far, by engine name (the release index records them)."""
        return dict(self._engines)

    def input_digest(self, artifact_id: str) -> str | None:
        """The content digest of a stage input: a source folder's (SOURCE, UNMERGED) or a built artifact's; None
        while the artifact is not built."""
        if artifact_id == SOURCE:
            return self.source_digest("base")
        if artifact_id == UNMERGED:
            return self.source_digest("adapter")
        return artifact_digest(self.release.stage(artifact_id).output)

    def key(self, stage: Stage) -> str | None:
        """None while an input is not built."""
        kind = KINDS[stage.kind]
        if kind.reads_sources:
            inputs = {which: self.source_digest(which) for which in kind.reads_sources}
        else:
            inputs = {n: self.input_digest(n) for n in stage.needs}
            if None in inputs.values():
                return None
        extra = kind.key_extras(stage, self.engine_of)
        options = portable(stage.options, self.release.file.parent)
        blob = {"kind": stage.kind, "options": options, "inputs": inputs, "versions": self.versions, **extra}
        return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


def portable(value, here: Path):
    """Options as a stage key sees them: every absolute path (a calibration file, a recipe, an adapter's folder in
    NAME=PATH, a flag's =PATH) relative to the release file's folder ``here`` when inside it, else by its name, so
    jobs on machines with other folder layouts compute the same key. What those files hold is in the key already
    (the inputs' digests, the kinds' extras)."""
    if isinstance(value, dict):
        return {k: portable(v, here) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v, here) for v in value]
    if not isinstance(value, str):
        return value
    head, eq, path = value.rpartition("=") if "=" in value else ("", "", value)
    if not os.path.isabs(path):
        return value
    inside_here = Path(os.path.normpath(path)).is_relative_to(here)
    return head + eq + (os.path.relpath(path, here) if inside_here else Path(path).name)


def artifact_digest(output: Path) -> str | None:
    """sha256 over the (name, sha256) of an artifact's files as its manifest lists them; None when the
    output or its manifest is missing or a file's size differs (a damaged or foreign output)."""
    manifest = read_manifest(output) if output.exists() else None
    if not manifest or not manifest.get("files"):
        return None
    folder = output if output.is_dir() else output.parent
    files = {n: f for n, f in manifest["files"].items() if n != CARD}
    for name, entry in files.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != entry["size"]:
            return None
    return hashlib.sha256("".join(f"{n}\0{f['sha256']}\n" for n, f in sorted(files.items())).encode()).hexdigest()


def recorded_key(stage: Stage) -> tuple[str | None, str | None]:
    """(key, status) recorded with a stage's finished output, or (None, None)."""
    if KINDS[stage.kind].report:
        marker = stage.output / MARKER
        try:
            state = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError):
            return None, None
        return state.get("key"), "ok" if state.get("passed") else state.get("verdict", "failed")
    if artifact_digest(stage.output) is None:
        return None, None
    last = last_step(stage.output)
    return (last.get("release") or {}).get("key"), last.get("status")


def outputs(stage: Stage) -> list[Path]:
    """What a stage writes, in the order it makes them whole (a .gguf's sidecar manifest, then the file; a folder,
    a split GGUF's too, holds its manifest)."""
    return [manifest_path(stage.output), stage.output] if stage.output.suffix == ".gguf" else [stage.output]
