"""A Ray cluster of N nodes on this machine: the head and each further node is `ray start --block` in a session
of its own under the guard, on 127.0.0.1 with ports of its own, its own CPUs and temp folder. It stands in for
several machines where there is one (`release --ray auto`, the tests) and is always taken down whole: every
process of each node's session, on success, failure, Ctrl-C, and (through the guard) when the workbench dies.

Which Python runs it is the caller's: the workbench's own for a release, an engine's for serving over Ray."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from .errors import EnvironmentProblem
from .process import HOST, free_port, session_alive, start_guarded, stop_guarded

# Waits for the nodes from inside the cluster's Python (so that it need not be the workbench's).
_NODES_PROBE = """
import sys, time, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
deadline = time.monotonic() + float(sys.argv[3])
while time.monotonic() < deadline:
    alive = sum(n["Alive"] for n in ray.nodes())
    if alive >= int(sys.argv[2]):
        print(alive); sys.exit(0)
    time.sleep(0.5)
print(alive); sys.exit(1)
"""


class LocalRayCluster:
    """A Ray cluster of ``nodes`` nodes on this machine, as a context manager: entering starts the nodes one at a
    time, each waited for (up to ``ready_timeout`` seconds) until it has joined; leaving takes every node down
    (stop). ``python`` runs Ray; ``cpus_per_node``: each node's --num-cpus; ``address``: the head's host:port."""
    def __init__(self, python: str, nodes: int, cpus_per_node: int, env: dict[str, str] | None = None,
                 ready_timeout: float = 120.0):
        self.python, self.nodes, self.cpus = python, nodes, cpus_per_node
        self.env = {**os.environ, **(env or {}), "RAY_USAGE_STATS_ENABLED": "0"}
        self.ready_timeout = ready_timeout
        self.folder = Path(tempfile.mkdtemp(prefix="wb-ray-"))  # short: Ray's socket paths live under it
        self.port = free_port()
        self.address = f"{HOST}:{self.port}"
        self.procs: list[subprocess.Popen] = []

    def _argv(self, rank: int) -> list[str]:
        ports = {flag: str(free_port()) for flag in ("--node-manager-port", "--object-manager-port", "--metrics-export-port",
                                                     "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                                                     "--runtime-env-agent-port")}
        argv = [self.python, "-m", "ray.scripts.scripts", "start", "--block", "--node-ip-address", HOST,
                "--num-cpus", str(self.cpus), "--disable-usage-stats", *[x for kv in ports.items() for x in kv]]
        if rank == 0:
            return argv + ["--head", "--port", str(self.port), "--temp-dir", str(self.folder), "--include-dashboard", "false"]
        return argv + ["--address", self.address]

    def __enter__(self) -> "LocalRayCluster":
        try:
            for rank in range(self.nodes):
                self.procs.append(start_guarded(self._argv(rank), self.folder / f"node{rank}.log", self.env))
                self._wait(rank + 1)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _wait(self, nodes: int) -> None:
        """Until ``nodes`` nodes are alive; fails at once when a node's process ends."""
        probe = subprocess.Popen([self.python, "-c", _NODES_PROBE, self.address, str(nodes), str(self.ready_timeout)],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env)
        try:
            while probe.poll() is None:
                dead = next((rank for rank, p in enumerate(self.procs) if p.poll() is not None), None)
                if dead is not None:
                    raise EnvironmentProblem(f"local Ray cluster: node {dead} exited during start-up: {self._log_tail(dead)}")
                time.sleep(0.5)
        finally:
            probe.kill()
            said = probe.communicate()[0].strip().splitlines()
        if probe.returncode != 0:
            raise EnvironmentProblem(f"local Ray cluster: node {nodes - 1} did not join within {self.ready_timeout:.0f}s "
                                     f"({said[-1] if said else 'no answer'}); its log: {self._log_tail(nodes - 1)}")

    def _log_tail(self, rank: int) -> str:
        lines = (self.folder / f"node{rank}.log").read_text(errors="replace").strip().splitlines()
        return next((line for line in reversed(lines) if "Error" in line), lines[-1] if lines else "(empty log)")

    @property
    def sessions(self) -> list[int]:
        """The session of each node (its guard's pid): every Ray process of the node is in it."""
        return [p.pid for p in self.procs]

    def stop(self) -> None:
        """Each node's guard takes its session down; what is still dying is waited for, a straggler killed."""
        for proc in reversed(self.procs):
            stop_guarded(proc, grace=10.0)
        deadline = time.monotonic() + 10
        while (left := [pid for sid in self.sessions for pid in session_alive(sid)]) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.procs = []
        shutil.rmtree(self.folder, ignore_errors=True)
