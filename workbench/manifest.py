"""workbench.json: how an artifact was made — its steps (inputs with hashes, options, tool versions,
metrics) and the sha256 and size of every file it holds."""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import json
import threading
from pathlib import Path

from .checkpoint import MANIFEST_NAME, replace_file, sha256_file
from .gguffiles import SPLIT_NAME, gguf_parts, is_gguf_set
from .hub import hub_origin
from .safety import OWNED_MARKER, remote_code_trusted

FORMAT_VERSION = 1
DIGEST_CACHE = "digests.json"
_DIGESTS_LOCK = threading.Lock()
# Libraries whose versions decide what an artifact contains.
TRACKED_PACKAGES = (
    "workbench", "torch", "transformers", "peft", "safetensors", "tokenizers",
    "accelerate", "llmcompressor", "compressed-tensors", "gguf",
)


def tool_versions() -> dict[str, str]:
    """The installed version of each of TRACKED_PACKAGES (those not installed left out), for a manifest step."""
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def cached_sha256(path: Path) -> str:
    """sha256 of a file, remembered by (path, size, mtime_ns, inode) in $WORKBENCH_HOME/digests.json: a
    cached release stage does not re-read gigabytes of unchanged inputs. ``inspect --check`` re-hashes."""
    from .home import workbench_home

    st = path.stat()
    key = str(path.resolve())
    stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
    cache_file = workbench_home() / DIGEST_CACHE
    entry = _read_digests(cache_file).get(key)
    if isinstance(entry, dict) and entry.get("stamp") == stamp:
        return entry["sha256"]
    digest = sha256_file(path)
    with _DIGESTS_LOCK:  # input folders are hashed on worker threads
        cache = {k: v for k, v in _read_digests(cache_file).items() if Path(k).exists()}  # forget deleted files
        cache[key] = {"stamp": stamp, "sha256": digest}
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        replace_file(cache_file, json.dumps(cache))
    return digest


def _read_digests(cache_file: Path) -> dict:
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return cache if isinstance(cache, dict) else {}


# Files of an artifact that say about it rather than make it up: rewritten by every release run
NOT_CONTENT = (MANIFEST_NAME, OWNED_MARKER, "README.md")


def content_digest(artifact: Path) -> str:
    """sha256 of exactly the bytes an engine loads from ``artifact``: a .gguf file's own; over the (name, sha256)
    of every part of a split GGUF (named by its folder or any part); or over those of a folder's files less its
    manifest, model card and ownership marker. A verification records it and vouches for the artifact only
    while it is unchanged."""
    if is_gguf_set(artifact):
        files = gguf_parts(artifact)
        if len(files) == 1:
            return cached_sha256(files[0])
    else:
        files = [p for p in sorted(artifact.iterdir()) if p.is_file() and p.name not in NOT_CONTENT]
    return hashlib.sha256("".join(f"{p.name}\0{cached_sha256(p)}\n" for p in files).encode()).hexdigest()


def folder_digest(folder: Path) -> dict:
    """sha256 of every file of an input folder (cached_sha256), and one digest over all of them."""
    files = {p.name: cached_sha256(p) for p in sorted(folder.iterdir()) if p.is_file()}
    combined = hashlib.sha256("".join(f"{n}\0{h}\n" for n, h in files.items()).encode()).hexdigest()
    origin = hub_origin(folder)  # a snapshot of huggingface_hub's cache: the repository and commit it holds
    return {"path": str(folder.resolve()), "sha256": combined, "files": files, **({"hub": origin} if origin else {})}


def now() -> str:
    """The current UTC time in ISO 8601, to the second (a step's ``started``)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def manifest_path(artifact: Path) -> Path:
    """A folder artifact carries workbench.json (a split GGUF's folder too, so a part's is its folder's); a
    single-file artifact (a .gguf) a sidecar beside it."""
    if artifact.is_dir():
        return artifact / MANIFEST_NAME
    if SPLIT_NAME.match(artifact.name):
        return artifact.parent / MANIFEST_NAME
    return artifact.with_name(artifact.name + "." + MANIFEST_NAME)


def read_manifest(artifact: Path) -> dict | None:
    """The manifest of ``artifact`` (a folder, a single file or a split GGUF's part), or None when it has none,
    it is not valid JSON, or (a part) its folder's manifest does not list that part. A single file's sidecar
    is its manifest whatever names it lists (the file may have been renamed with it)."""
    path = manifest_path(artifact)
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if not artifact.is_dir() and SPLIT_NAME.match(artifact.name) and artifact.name not in (manifest.get("files") or {}):
        return None  # the folder's manifest is another artifact's
    return manifest


def last_step(artifact: Path) -> dict:
    """The step that made ``artifact`` (the last in its manifest); {} when it has no manifest."""
    return ((read_manifest(artifact) or {}).get("steps") or [{}])[-1]


def _write(target: Path, step: dict, parent: Path | None, files: dict[str, Path], known_sha256: dict[str, str]) -> dict:
    inherited = (read_manifest(parent) or {}).get("steps", []) if parent else []
    if remote_code_trusted():  # the user let the model's own code run: the artifact says so
        step = {**step, "trust_remote_code": True}
    entries = {name: {"sha256": known_sha256.get(name) or sha256_file(p), "size": p.stat().st_size} for name, p in files.items()}
    manifest = {"workbench_manifest": FORMAT_VERSION, "steps": [*inherited, step], "files": entries}
    target.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def write_manifest(folder: Path, step: dict, parent: Path | None, known_sha256: dict[str, str]) -> dict:
    """Write ``folder``/workbench.json: the parent's steps (if it has a manifest) plus ``step``, and the hash
    of every file. ``known_sha256`` holds hashes computed while writing; the other files are hashed here."""
    files = {p.name: p for p in sorted(folder.iterdir()) if p.is_file() and p.name not in (MANIFEST_NAME, OWNED_MARKER)}
    return _write(folder / MANIFEST_NAME, step, parent, files, known_sha256)


def write_file_manifest(artifact: Path, step: dict, parent: Path | None, sha256: str | None = None,
                        content: Path | None = None) -> dict:
    """The sidecar manifest of a single-file artifact (``sha256``: its hash, if computed while writing).
    ``content`` is where the bytes are while the manifest is written before the file is renamed into place:
    a crash in between leaves a manifest whose file is missing, which nothing trusts."""
    known = {artifact.name: sha256} if sha256 else {}
    return _write(manifest_path(artifact), step, parent, {artifact.name: content or artifact}, known)
