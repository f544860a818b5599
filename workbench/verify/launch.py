"""Start an engine's OpenAI-compatible server on 127.0.0.1, wait until it answers, and always tear down
its whole process group (success, failure, timeout, Ctrl-C)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from ..errors import BadInput, EnvironmentProblem
from ..process import GUARD_RECORD_ENV, HOST, port_in_use, signal_session, start_guarded, stop_guarded
from ..engines import ReferenceKernels, usable_cpus
from ..home import workbench_home
from .command import PLUGINS, EngineCommand

# A Python exception line, as engines log it behind their prefixes: vLLM's process tag "(Worker pid=N) " and
# log header "ERROR 11-22 06:21:17 [file.py:1063] ", SGLang's "[2026-11-22 06:21:17 TP0] ", torch's "[rank0]: ".
_PREFIX = re.compile(r"^(?:\(\w+(?: pid=\d+)?\)\s*|\[rank\d+\]:\s*|(?:DEBUG|INFO|WARNING|ERROR|CRITICAL) [\d-]+ [\d:]+ \[[^\]]*\]\s*"
                     r"|\[\d{4}-\d\d-\d\d [\d:]+[^\]]*\]\s*)+")
_EXCEPTION = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Exit|Interrupt)\b:?( .*)?$")




def plugin_folder(kernels: ReferenceKernels) -> str:
    """A private folder, for the engine's PYTHONPATH, holding the plugin module and the minimal distribution
    metadata (a .dist-info with its entry point) that importlib.metadata discovers in every engine process;
    the engine's own environment is not changed."""
    folder = Path(tempfile.mkdtemp(prefix="wb-plugin-"))
    shutil.copy2(PLUGINS / f"{kernels.module}.py", folder / f"{kernels.module}.py")
    info = folder / f"workbench_{kernels.module}-0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: workbench-{kernels.module}\nVersion: 0\n")
    (info / "entry_points.txt").write_text(f"[{kernels.entry_point_group}]\nworkbench_{kernels.module} = {kernels.module}:register\n")
    return str(folder)


# EADDRINUSE as Python, uvicorn and ZMQ report it (any case): a port (the API's or one the engine picks for its own
# processes) taken between its choice and the bind
PORT_CLASH = "address already in use"
PORT_ATTEMPTS = 3


class EngineFailed(EnvironmentProblem):
    """The engine died or never became ready; carries the end of its log."""


def engine_server(*args, log_path: Path | None = None, ready_timeout: float = 600.0, groups_file: Path | None = None,
                  **command) -> "Server":
    """A Server (not started) of ``EngineCommand(*args, **command)``."""
    return Server(EngineCommand(*args, **command), log_path, ready_timeout, groups_file)


class Server:
    """``with Server(command) as server:`` — the engine ``command`` (an EngineCommand) running; ``server.url`` is
    its base URL. Starts it under the guard, waits until it answers, pauses and resumes it for a serving session,
    and always takes its whole process group down."""

    def __init__(self, command: EngineCommand, log_path: Path | None = None, ready_timeout: float = 600.0,
                 groups_file: Path | None = None):
        self.command = command
        self.spec = command.spec
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix=f"{self.spec.name}-", suffix=".log")[1])
        self.ready_timeout = ready_timeout
        self.groups_file = groups_file
        self.port_clashes = 0  # start-ups retried because a port chosen free was taken before the engine bound it
        self.proc: subprocess.Popen | None = None
        self.startup_seconds: float | None = None
        self.ready_offset = 0  # the log's size when the engine became ready: later errors come from the probes
        self._socket_dir: str | None = None
        self._plugin_dir: str | None = None
        self.node_procs: list[subprocess.Popen] = []  # nodes 1.. of a multi-node server ("ranks")
        self.cluster = None  # the local Ray cluster of a multi-node server ("ray")
        self.reused = False  # handed to this run already up by a serving session (pool.py)

    @property
    def url(self) -> str:
        """The base URL of the engine's HTTP API, as its command chose the port."""
        return self.command.url

    def identity(self) -> tuple:
        """What makes two servers the same engine process for a client: the command's identity, and where its
        guard records its group."""
        return *self.command.identity(), str(self.groups_file)

    def alive(self) -> bool:
        """Started and not exited (every node)."""
        return self.proc is not None and all(p.poll() is None for p in (self.proc, *self.node_procs))

    def pause(self) -> None:
        """Stop the engine's processes (SIGSTOP) while it waits for another run: an idle engine may spin (SGLang's
        scheduler takes a whole core). Each guard stays awake: it still takes the engine down if we die."""
        self._signal_engine(signal.SIGSTOP)

    def resume(self) -> None:
        """Continue the engine's processes after ``pause`` (SIGCONT); harmless on a running engine."""
        self._signal_engine(signal.SIGCONT)

    def _signal_engine(self, sig: int) -> None:
        for guard in (self.proc, *self.node_procs):
            if guard is not None and guard.poll() is None:
                signal_session(guard.pid, sig, spare=guard.pid)  # the guard leads its session: sid == its pid

    def log_size(self) -> int:
        """The engine log's size in bytes now (0 if unreadable): where a run's own errors start in it."""
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def environment(self) -> dict[str, str]:
        """The engine's environment: ours, the command's variables, where its guard records its group, its caches,
        its socket folder and the reference kernels' plugin folder (both made here, removed by stop)."""
        env = {**os.environ, **self.command.applied_env}
        if self.groups_file is not None:
            env[GUARD_RECORD_ENV] = str(self.groups_file)
        cache = workbench_home() / "cache" / self.spec.name
        for var, sub in self.spec.cache_env.items():
            env.setdefault(var, str(cache / sub))
        if self.spec.socket_dir_env:
            self._socket_dir = tempfile.mkdtemp(prefix=f"wb-{self.spec.name}-")
            env[self.spec.socket_dir_env] = self._socket_dir
        if self.command.reference_kernels:
            self._plugin_dir = plugin_folder(self.command.reference_kernels)
            env["PYTHONPATH"] = os.pathsep.join(p for p in (self._plugin_dir, env.get("PYTHONPATH")) if p)
        return env

    def __enter__(self) -> "Server":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        """Start the engine and wait until it answers. A start-up that dies on a port another process took
        between its choice and the engine's bind (another job starting servers on this machine) is retried on
        new ports, its log kept beside, up to PORT_ATTEMPTS in all; any other failure is the engine's."""
        for attempt in range(1, PORT_ATTEMPTS + 1):
            try:
                return self._start_once()
            except EngineFailed:
                if attempt == PORT_ATTEMPTS or PORT_CLASH not in _text(self.log_path).lower():
                    raise
            self.port_clashes += 1
            self.log_path.replace(self.log_path.with_name(f"{self.log_path.stem}-port-clash-{attempt}{self.log_path.suffix}"))
            self.command.choose_new_ports()

    def _start_once(self) -> None:
        if port_in_use(self.command.port):
            raise BadInput(f"port {self.command.port} on {HOST} is already in use")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        env = self.environment()
        try:
            command = self.command
            if command.multinode and command.multinode.via == "ray":
                env["RAY_ADDRESS"] = self._start_ray_cluster(env)
            self.proc = start_guarded(command.argv(), self.log_path, command.node_env(env, 0))
            self.node_procs = [start_guarded(command.argv(rank), self.node_log(rank), command.node_env(env, rank))
                               for rank in range(1, len(command.node_ports) + 1)]
        except OSError as exc:
            self.stop()
            raise EnvironmentProblem(f"{self.spec.name}: cannot start {self.command.python}: {exc}") from None
        try:
            self._wait_ready(t0)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = round(time.monotonic() - t0, 1)
        self.ready_offset = self.log_path.stat().st_size

    def node_log(self, rank: int) -> Path:
        """The log of node ``rank`` (1..) of a multi-node server, beside node 0's: <stem>-node<rank><suffix>."""
        return self.log_path.with_name(f"{self.log_path.stem}-node{rank}{self.log_path.suffix}")

    def _start_ray_cluster(self, env: dict[str, str]) -> str:
        """A Ray cluster of ``nodes`` local nodes in the engine's own Python, the CPUs split between them."""
        from ..raycluster import LocalRayCluster

        python, nodes = self.command.python, self.command.nodes
        if subprocess.run([python, "-c", "import ray"], capture_output=True).returncode != 0:
            raise EnvironmentProblem(f"{self.spec.name}'s multi-node path runs over Ray, which its environment lacks: "
                                     f"{Path(python).parent / 'pip'} install ray")
        self.cluster = LocalRayCluster(python, nodes, max(1, len(usable_cpus()) // nodes), env)
        self.cluster.__enter__()
        return self.cluster.address

    def _wait_ready(self, t0: float) -> None:
        while True:
            code = self.proc.poll()
            if code is not None:
                raise EngineFailed(f"{self.spec.name} exited with code {code} during start-up{self._cause()}; "
                                   f"log {self.log_path}:\n{self.log_tail()}")
            for rank, node in enumerate(self.node_procs, 1):
                if node.poll() is not None:
                    raise EngineFailed(f"{self.spec.name} node {rank} exited with code {node.returncode} during start-up; "
                                       f"log {self.node_log(rank)}:\n{_tail(self.node_log(rank))}")
            if time.monotonic() - t0 > self.ready_timeout:
                raise EngineFailed(f"{self.spec.name} not ready after {self.ready_timeout:.0f}s{self._cause()}; "
                                   f"log {self.log_path}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + self.spec.ready_path, timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.5)

    def _cause(self) -> str:
        line = self.first_error()
        return f": {line}" if line else ""

    def first_error(self, since: int = 0) -> str | None:
        """The engine's own first error line in its log from byte ``since`` on (its root cause)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(since)
                return first_error_line(f.read().decode(errors="replace"))
        except OSError:
            return None

    def log_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines of the engine's log, for an error message."""
        return _tail(self.log_path, lines)

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM the whole process group, then SIGKILL whatever is left after ``grace`` seconds."""
        self.resume()  # a paused engine would not see the SIGTERM
        for proc in [*self.node_procs, *([self.proc] if self.proc is not None else [])]:
            stop_guarded(proc, grace)
        self.proc, self.node_procs = None, []
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster = None
        for folder in (self._socket_dir, self._plugin_dir):
            if folder:
                shutil.rmtree(folder, ignore_errors=True)
        self._socket_dir = self._plugin_dir = None

    def get(self, path: str, timeout: float = 30.0) -> dict:
        """The engine's JSON reply to a GET of ``path``; an HTTP error raises urllib's HTTPError."""
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict, timeout: float = 120.0) -> dict:
        """The engine's JSON reply to ``body`` POSTed as JSON to ``path``; an HTTP error raises urllib's HTTPError."""
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())


def first_error_line(log: str) -> str | None:
    """The first exception line (``RuntimeError: ...``) of an engine log, else its first ERROR line."""
    lines = [_PREFIX.sub("", line).strip() for line in log.splitlines()]
    for i, line in enumerate(lines):
        if _EXCEPTION.match(line):
            if "validation error" in line:  # pydantic names the failed check on the next lines
                detail = next((d for d in lines[i + 1:i + 3] if "error," in d), None)
                line = f"{line}: {detail}" if detail else line
            return line[:400]
    return next((line[:400] for line in lines if "ERROR" in line), None)


def _text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _tail(path: Path, lines: int = 20) -> str:
    return "\n".join(_text(path).splitlines()[-lines:])
