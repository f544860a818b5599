"""Keeps an engine from outliving the workbench process that started it, even when that process is
SIGKILLed (a killed CI job, an OOM kill) and can run no clean-up of its own.

Run as a script (stdlib only, so it starts in milliseconds):  python guard.py ENGINE-ARGV...
It is the leader of the engine's process group and asks Linux to send it SIGTERM when its parent dies
(PR_SET_PDEATHSIG). On that signal it terminates the group, waits a grace period, then SIGKILLs the whole
group, itself included, and (when it leads its session) every other process of the session. When the engine exits on its own, the guard exits with the engine's code.
With WORKBENCH_GUARD_RECORD set, it appends its process group id to that file before starting the engine,
so tests and tools can check exactly the groups they started are gone.
PR_SET_PDEATHSIG fires when the parent *thread* exits: start servers from the main thread.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

PR_SET_PDEATHSIG = 1
GRACE_SECONDS = 10.0


def set_parent_death_signal(sig: int) -> None:
    """Linux only; elsewhere a no-op (the caller's own clean-up is then the only one)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)


def _signal_group(sig: int) -> None:
    try:
        os.killpg(0, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_session_rest() -> None:
    """SIGKILL the processes of this session outside the guard's group (a Ray worker moves to a group of its
    own), when the guard leads the session (started with a new session): never the caller's session."""
    if os.getsid(0) != os.getpid():
        return
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[3]) == os.getpid() and int(fields[2]) != os.getpid():  # session, process group
                os.kill(int(entry), signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            continue


def main(argv: list[str]) -> int:
    """Run the engine command ``argv`` under the guard until it exits; returns the exit code to leave with: the
    engine's, or 1 when the parent died before the death signal was armed."""
    parent = os.getppid()
    terminating: list[float] = []

    def on_term(signum, frame):
        if not terminating:
            terminating.append(time.monotonic())
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the group signal below reaches us too
            _signal_group(signal.SIGTERM)
            _signal_group(signal.SIGCONT)  # an engine paused between runs (verify/pool.py) sees it now

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the death signal was armed
        return 1
    record = os.environ.get("WORKBENCH_GUARD_RECORD")
    if record:  # before the engine exists: whoever reads the record can check the group is gone
        with open(record, "a") as f:
            f.write(f"{os.getpgrp()}\n")
    child = subprocess.Popen(argv)
    while True:
        try:
            code = child.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            code = None
        if terminating and (code is not None or time.monotonic() - terminating[0] > GRACE_SECONDS):
            _kill_session_rest()
            _signal_group(signal.SIGKILL)  # engine workers that outlived their parent, and this guard
        if code is not None:
            _kill_session_rest()
            return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
