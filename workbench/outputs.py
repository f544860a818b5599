"""Outputs that appear whole or not at all: a temporary folder or file beside the final path, renamed into
place on success, removed on any failure (Ctrl-C included); a killed run's leftovers are removed by the next run;
an existing output is replaced only when asked."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from .errors import BadInput, as_disk_full
from .safety import OWNED_MARKER, claim, owned

_PARTIAL = ".partial-"
_REPLACED = ".replaced-"


@contextlib.contextmanager
def atomic_output_dir(final: Path, force: bool) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``final``; rename it into place only on success."""
    with _atomic_output(final, force, make_dir=True) as tmp:
        yield tmp


@contextlib.contextmanager
def atomic_output_file(final: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary file path beside ``final`` (not created); rename it into place only on success."""
    with _atomic_output(final, force, make_dir=False) as tmp:
        yield tmp


@contextlib.contextmanager
def _atomic_output(final: Path, force: bool, make_dir: bool) -> Iterator[Path]:
    """On any exception (Ctrl-C included) the temporary is removed; leftovers of a killed run (their pid
    no longer alive) are removed by the next run. An existing output is replaced only with ``force``; an
    output that is a symbolic link is refused (replacing it would write where the link points, or drop the link)."""
    final = Path(os.path.abspath(final))
    if final.is_symlink():
        raise BadInput(f"output {final} is a symbolic link (to {os.readlink(final)}): name the real location")
    if final.exists() and not force:
        raise BadInput(f"output exists: {final} (use --force to replace it)")
    parent = final.parent
    tmp = parent / f".{final.name}{_PARTIAL}{os.getpid()}"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_partials(parent, final.name)
        remove_path(tmp)
        if make_dir:
            tmp.mkdir()
            claim(tmp)  # a killed run's folder is known as ours by this marker, removed before the rename
        else:
            tmp.touch()
    except OSError as exc:
        raise as_disk_full(exc, final) or BadInput(f"cannot write output at {final}: {exc.strerror or exc}") from None
    try:
        yield tmp
        if make_dir:
            (tmp / OWNED_MARKER).unlink()
        rename_into_place(tmp, final, force)
    except BaseException as exc:
        full = as_disk_full(exc, final, _size(tmp)) if isinstance(exc, OSError) else None  # measured before removal
        remove_path(tmp)
        if full is not None:
            raise full from None
        raise


def rename_into_place(tmp: Path, final: Path, force: bool) -> None:
    """Rename ``tmp`` to ``final``; with ``force`` an existing ``final`` is renamed away first, removed after."""
    old = None
    if os.path.lexists(final):
        if not force:  # made by another process while this one wrote
            raise BadInput(f"output exists: {final} (it appeared while writing; use --force to replace it)")
        old = final.parent / f".{final.name}{_REPLACED}{os.getpid()}"
        os.rename(final, old)
    os.rename(tmp, final)
    if old is not None:
        remove_path(old)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def remove_path(path: Path) -> None:
    """Remove a file, a link (never what it points to) or a folder tree (errors ignored); nothing when absent."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _remove_stale_partials(parent: Path, name: str) -> None:
    """A dead process's temporaries: files by their name, folders only when they carry the workbench's marker."""
    for p in [*parent.glob(f".{name}{_PARTIAL}*"), *parent.glob(f".{name}{_REPLACED}*")]:
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)) and (owned(p) or p.name.startswith(f".{name}{_REPLACED}")
                                                            or not p.is_dir()):
            remove_path(p)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
