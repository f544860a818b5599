"""Child processes the workbench starts (engines, Ray nodes): each in a session of its own under the guard
(guard.py), on 127.0.0.1 ports nothing else holds, and always taken down with everything they started."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from .errors import EnvironmentProblem

HOST = "127.0.0.1"
GUARD = str(Path(__file__).with_name("guard.py"))
GUARD_RECORD_ENV = "WORKBENCH_GUARD_RECORD"  # a file the guard appends its process group id to


def free_port(highest: int = 65535) -> int:
    """A port on 127.0.0.1 that nothing listens on, at most ``highest``."""
    rng = random.Random()
    for _ in range(1000):
        with socket.socket() as s:
            try:
                s.bind((HOST, 0 if highest >= 65535 else rng.randint(20000, highest)))
            except OSError:
                continue
            return s.getsockname()[1]
    raise EnvironmentProblem(f"no free port on {HOST} up to {highest}")


def port_in_use(port: int) -> bool:
    """Whether something accepts connections on ``port`` of 127.0.0.1."""
    with socket.socket() as s:
        return s.connect_ex((HOST, port)) == 0


def start_guarded(argv: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """``argv`` under the guard, which leads a new session and group: if this process dies without cleaning
    up, the guard takes down the group and the rest of the session. Output goes to ``log``."""
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-I", "-S", GUARD, *argv], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)


def stop_guarded(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM the guard's process group, then SIGKILL it after ``grace`` seconds (the guard, on its way out,
    kills the rest of its session); waits for the guard."""
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        pgid = None
    if pgid is not None:
        signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and group_alive(pgid):
            proc.poll()
            time.sleep(0.2)
        signal_group(pgid, signal.SIGKILL)
    proc.wait()


def signal_session(sid: int, sig: int, spare: int) -> None:
    """Send ``sig`` to every process of session ``sid`` except ``spare`` (its guard, which must stay able to act)."""
    for pid in session_alive(sid):
        if pid != spare:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def session_alive(sid: int) -> list[int]:
    """The processes still in session ``sid`` (zombies excluded)."""
    alive = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            alive.append(int(entry))
    return alive


def signal_group(pgid: int, sig: int) -> None:
    """Send ``sig`` to process group ``pgid``; a group that is gone, or not ours to signal, is passed over."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def group_alive(pgid: int) -> bool:
    """Whether process group ``pgid`` still has a process this process may signal."""
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def return_freed_memory() -> None:
    """Make freed tensors go back to the OS. glibc serves blocks below its dynamic mmap threshold (which
    grows to 32 MiB after the first large free) from the heap, where fragmentation keeps them resident:
    measured +55 MB RSS per decoder layer walked (1024 wide) and a 2.4 GiB merge of an 8B model. A fixed
    1 MiB threshold maps every large block on its own and unmaps it at free. No-op without glibc."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "mallopt"):
            libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
    except OSError:
        pass


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
