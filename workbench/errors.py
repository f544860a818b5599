"""Errors every verb raises, and the exit codes they map to. The CLI turns each into one line on stderr.

| code | meaning |
|---|---|
| 0 | ok |
| 1 | an artifact failed a check |
| 2 | bad input (paths, files, options): nothing was written |
| 3 | an engine, tool or resource (memory) the command needs is missing |
| 4 | incomplete: a required check could not run, so there is no verdict |
| 5 | internal error: a bug in the workbench (the traceback is in a log file) |
"""

import errno
import re
import shutil
from pathlib import Path

OK, FAILED, BAD_INPUT, MISSING, INCOMPLETE, INTERNAL = 0, 1, 2, 3, 4, 5


class WorkbenchError(Exception):
    """Base class; ``exit_code`` is one of the codes above."""

    exit_code = BAD_INPUT


class BadInput(WorkbenchError):
    """The user's input (paths, files, options) cannot be used."""

    exit_code = BAD_INPUT


class ArtifactFailed(WorkbenchError):
    """The artifact was produced or found, but failed a check."""

    exit_code = FAILED


class EnvironmentProblem(WorkbenchError):
    """An engine or tool the command needs is missing or broken."""

    exit_code = MISSING


class OutOfMemory(EnvironmentProblem):
    """The machine has less memory than the step needs; the message gives both figures."""


class DiskFull(EnvironmentProblem):
    """The file system ran out of space while writing; the message gives what was written and what is free."""


class Incomplete(WorkbenchError):
    """A required check could not run: neither a pass nor a failure."""

    exit_code = INCOMPLETE


GIB = 2**30


def available_memory() -> int:
    """Bytes this process can still allocate: MemAvailable, or the cgroup's limit minus its usage if lower."""
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        used = int(open("/sys/fs/cgroup/memory.current").read())
        if limit != "max":
            available = min(available or 1 << 62, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available if available is not None else 1 << 62


def out_of_memory(what: str, needed: int | None) -> OutOfMemory:
    """The OutOfMemory error for ``what``, with the bytes it needs (``needed``; None: not known) and those
    available now."""
    need = f"needs ~{needed / GIB:.1f} GiB, " if needed else ""
    return OutOfMemory(f"out of memory {what}: {need}{available_memory() / GIB:.1f} GiB available")


def as_out_of_memory(exc: BaseException, what: str) -> OutOfMemory | None:
    """The OutOfMemory for a failed allocation (MemoryError, torch's CPU or CUDA allocator), else None."""
    message = str(exc)
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        pass
    elif not (isinstance(exc, RuntimeError) and ("can't allocate memory" in message or "out of memory" in message)):
        return None
    tried = re.search(r"allocate (?:memory: you tried to allocate )?(\d+) bytes", message)
    return out_of_memory(what, int(tried.group(1)) if tried else None)


MIB = 2**20
_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")


def as_disk_full(exc: BaseException, target: Path | str | None, written: int | None = None) -> DiskFull | None:
    """The DiskFull for a write that hit ENOSPC/EDQUOT while making ``target`` (None: not known; ``written``:
    bytes it had reached), with the space left on that file system; None for any other error."""
    if not isinstance(exc, OSError):
        return None
    # numpy's tofile (gguf-py writes tensors with it) reports a short write without an errno
    if exc.errno not in (errno.ENOSPC, errno.EDQUOT) and not (exc.errno is None and _SHORT_WRITE.fullmatch(str(exc))):
        return None
    target = target or getattr(exc, "filename", None)
    where = Path(target or Path.cwd())
    while not where.exists() and where != where.parent:
        where = where.parent
    usage = shutil.disk_usage(where)
    reached = f"{written / MIB:.1f} MiB written, " if written is not None else ""
    return DiskFull(f"no space left on device{f' writing {target}' if target else ''}: {reached}"
                    f"{usage.free / MIB:.1f} MiB free of {usage.total / MIB:.1f} MiB on that file system; nothing was kept")


def as_resource_error(exc: BaseException, what: str) -> EnvironmentProblem | None:
    """Memory or disk space running out, as the missing-resource error with its figures; else None."""
    return as_out_of_memory(exc, what) or as_disk_full(exc, None)


def check_fits(what: str, needed: int, duration: str = "") -> None:
    """Refuse at once, with the figures (and the run's estimated ``duration``, when given), a step that cannot
    fit in the memory available."""
    if needed > available_memory():
        error = out_of_memory(what, needed)
        raise OutOfMemory(f"{error}; it would take ~{duration}") if duration else error
