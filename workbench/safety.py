"""Containment, decided in one place: what the workbench may write, delete, read and run.

- A name that becomes part of a path (a release's name, its artifact and stage ids, an adapter's name)
  follows one rule, checked before anything runs.
- Every path the workbench writes, renames or deletes is resolved (symbolic links followed) and must lie
  inside the folder the user named for output.
- A file a checkpoint names (an index entry, a side file copied into the output) must resolve inside the
  checkpoint's folder: a link or an entry like ``../other/model.safetensors`` is refused (except a Hugging
  Face cache snapshot's links into its own blobs).
- A folder is deleted whole only when it carries the marker the workbench writes into the folders it
  creates (an output whose name a release file chose may already hold someone's files).
- Code shipped in a model or adapter folder (``auto_map``, ``trust_remote_code``) runs only when the user
  passed ``--trust-remote-code`` on the command line; a release file cannot turn it on.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterator

from .errors import BadInput, EnvironmentProblem

NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
NAME_RULE = "letters, digits, '.', '_' and '-', at most 128, not starting with '.' or '-'"
OWNED_MARKER = ".workbench-owned"  # written into a folder the workbench created; only such folders are removed
LOCK_NAME = ".workbench-release.lock"


def _custom_base_class(auto_mapping) -> bool:
    """peft records every base's class; only one outside transformers' own models is code from a folder
    (transformers_modules.*, what trust_remote_code imports)."""
    library = auto_mapping.get("parent_library", "") if isinstance(auto_mapping, dict) else ""
    return bool(auto_mapping) and not str(library).startswith("transformers.models.")


# (file, key, whether its value asks for code): a folder that asks transformers, peft or an engine to import its code
REMOTE_CODE_KEYS = (("config.json", "auto_map", bool), ("config.json", "trust_remote_code", bool),
                    ("tokenizer_config.json", "auto_map", bool), ("tokenizer_config.json", "trust_remote_code", bool),
                    ("adapter_config.json", "auto_mapping", _custom_base_class))
REMOTE_CODE_FLAG = "--trust-remote-code"

# The one switch for this process, set by the command line's --trust-remote-code (worker threads read it
# too, so it is a plain module setting rather than a context variable).
_policy = {"trust_remote_code": False}


def check_name(value: object, what: str) -> str:
    """``value`` if it is a safe path component, else a one-line BadInput naming ``what``."""
    if not isinstance(value, str) or not NAME.fullmatch(value):
        raise BadInput(f"{what}: {value!r} is not a name the workbench puts in a path ({NAME_RULE})")
    return value


def inside(root: Path, path: Path, what: str) -> Path:
    """``path`` resolved (links followed); refused unless it is ``root`` (resolved) or lies below it."""
    root_resolved, resolved = Path(root).resolve(), Path(path).resolve()
    if resolved != root_resolved and root_resolved not in resolved.parents:
        shown = f"{path} (which resolves to {resolved})" if Path(os.path.abspath(path)) != resolved else str(path)
        raise BadInput(f"{what}: {shown} is outside {root_resolved}")
    return resolved


def folder_file(folder: Path, name: str, what: str) -> Path:
    """A file a model folder names (an index entry, a side file): ``folder / name``, which must resolve inside
    it. The one exception is Hugging Face's cache: a snapshot (``<repo>/snapshots/<revision>``) links its files
    into ``<repo>/blobs``."""
    folder = Path(folder)
    path = folder / name
    if folder.parent.name == "snapshots" and ".." not in Path(name).parts and not Path(name).is_absolute():
        if path.is_symlink() and (folder.parent.parent / "blobs").resolve() in path.resolve().parents:
            return path
    inside(folder, path, f"{folder}: {what} {name!r}")
    return path


def claim(folder: Path) -> None:
    """Mark a folder the workbench just created as its own (so that a later run may remove it)."""
    (folder / OWNED_MARKER).write_text("created by workbench: it may remove this folder\n")


def owned(folder: Path) -> bool:
    """Whether ``folder`` is a folder (not a link to one) that carries the workbench's ownership marker (claim)."""
    return folder.is_dir() and not folder.is_symlink() and (folder / OWNED_MARKER).is_file()


def remove_owned(folder: Path, what: str) -> None:
    """Remove a folder the workbench made before; refuse one it did not make (no marker)."""
    if not os.path.lexists(folder):
        return
    if not owned(folder):
        raise BadInput(f"{what} {folder} exists and was not made by the workbench: not removing it (move it away, "
                       "or choose another output)")
    shutil.rmtree(folder)


def usable_output_folder(folder: Path, what: str) -> None:
    """A folder the workbench will write reports into: absent, empty, or made by the workbench."""
    if os.path.lexists(folder) and not owned(folder) and (not folder.is_dir() or folder.is_symlink() or any(folder.iterdir())):
        raise BadInput(f"{what} {folder} exists and was not made by the workbench: choose another folder")


@contextlib.contextmanager
def exclusive(folder: Path, what: str) -> Iterator[None]:
    """Hold the output folder's lock (flock: released by the kernel when the process dies, even by SIGKILL);
    a second run on the same folder is refused at once with the holder's pid."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise EnvironmentProblem(f"{what} {folder} is in use by another workbench run (pid {holder}): wait for it "
                                     "to finish, or use another output folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


# ---------------------------------------------------------------- code shipped with a model


@contextlib.contextmanager
def remote_code(trusted: bool) -> Iterator[None]:
    """For one command: whether a model folder's own code may run (the user's --trust-remote-code)."""
    before = _policy["trust_remote_code"]
    _policy["trust_remote_code"] = bool(trusted)
    try:
        yield
    finally:
        _policy["trust_remote_code"] = before


def remote_code_trusted() -> bool:
    """Whether the current command lets a model folder's own code run (--trust-remote-code; see remote_code)."""
    return _policy["trust_remote_code"]


def remote_code_request(folder: Path) -> tuple[Path, str] | None:
    """(file, key) of the first setting in ``folder`` that asks for its own code to run, or None."""
    for name, key, asks in REMOTE_CODE_KEYS:
        file = Path(folder) / name
        try:
            data = json.loads(file.read_text()) if file.is_file() else None
        except (OSError, ValueError):
            continue  # an unreadable file is reported by whoever reads it
        if isinstance(data, dict) and asks(data.get(key)):
            return file, key
    return None


def check_remote_code(folder: Path) -> None:
    """Refuse, in one line naming the file, a folder that asks to run its own code, unless the user trusts it."""
    found = remote_code_request(folder)
    if found and not remote_code_trusted():
        file, key = found
        raise BadInput(f"{file} asks to run code shipped with the model ({key}); the workbench runs it only with "
                       f"{REMOTE_CODE_FLAG} on the command line")


def check_no_remote_code_flag(args: list[str] | tuple[str, ...], where: str) -> None:
    """Engine arguments from a file or an option cannot enable remote code: only the command line's flag can."""
    for arg in args:
        if arg.split("=", 1)[0].replace("_", "-") == REMOTE_CODE_FLAG:
            raise BadInput(f"{where}: {arg} cannot be passed to the engine this way; give {REMOTE_CODE_FLAG} on the "
                           "workbench command line")
