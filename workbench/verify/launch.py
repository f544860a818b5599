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
from ..process import GUARD_RECORD_ENV, HOST, free_port, port_in_use, signal_session, start_guarded, stop_guarded
from ..safety import remote_code_trusted
from ..engines import (EngineSpec, Layout, ReferenceKernels, engine_python, has_cuda_gpu, launch_defaults, model_args,
                       multinode_of, node_flags, thread_binding, usable_cpus)
from ..home import workbench_home

# A Python exception line, as engines log it behind their prefixes: vLLM's process tag "(Worker pid=N) " and
# log header "ERROR 11-22 06:21:17 [file.py:1063] ", SGLang's "[2026-11-22 06:21:17 TP0] ", torch's "[rank0]: ".
_PREFIX = re.compile(r"^(?:\(\w+(?: pid=\d+)?\)\s*|\[rank\d+\]:\s*|(?:DEBUG|INFO|WARNING|ERROR|CRITICAL) [\d-]+ [\d:]+ \[[^\]]*\]\s*"
                     r"|\[\d{4}-\d\d-\d\d [\d:]+[^\]]*\]\s*)+")
_EXCEPTION = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Exit|Interrupt)\b:?( .*)?$")


PLUGINS = Path(__file__).resolve().parents[1] / "engine_plugins"


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


def joined_list(user: str | None, ours: str) -> str:
    """A comma-separated list setting (e.g. VLLM_DISABLED_KERNELS): the user's items, then ours not among them."""
    items = [i for i in (user or "").split(",") if i]
    return ",".join(items + [i for i in ours.split(",") if i not in items])


# EADDRINUSE as Python, uvicorn and ZMQ report it (any case): a port (the API's or one the engine picks for its own
# processes) taken between its choice and the bind
PORT_CLASH = "address already in use"
PORT_ATTEMPTS = 3


class EngineFailed(EnvironmentProblem):
    """The engine died or never became ready; carries the end of its log."""


class Server:
    """``with Server(...) as server:`` — a running engine; ``server.url`` is its base URL."""

    def __init__(
        self,
        spec: EngineSpec,
        model: Path,
        tp: int = 1,
        python: str | None = None,
        port: int | None = None,
        max_model_len: int | None = None,
        dtype: str | None = None,
        extra_args: tuple[str, ...] = (),
        log_path: Path | None = None,
        ready_timeout: float = 600.0,
        groups_file: Path | None = None,
        gpu: bool | None = None,
        cpus: list[int] | None = None,
        pp: int = 1,
        dp: int = 1,
        adapters: dict[str, Path] | None = None,
        lora_rank: int | None = None,
        reference_kernels: ReferenceKernels | None = None,
        nodes: int = 1,
    ):
        self.spec = spec
        self.nodes = nodes  # > 1: that many local node processes (or Ray nodes) serve one model
        self.model = Path(model)
        self.tp = tp
        self.layout = Layout(tp, pp, dp)
        self.adapters = dict(adapters or {})  # served unmerged: name -> adapter folder
        self.lora_rank = lora_rank
        self.python = engine_python(spec, python)
        self.port = port or free_port(spec.max_port)
        self.port_given = port is not None
        self.port_clashes = 0  # start-ups retried because a port chosen free was taken before the engine bound it
        self.max_model_len = max_model_len
        self.dtype = dtype
        self.extra_args = tuple(extra_args)
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix=f"{spec.name}-", suffix=".log")[1])
        self.ready_timeout = ready_timeout
        self.groups_file = groups_file
        gpu = has_cuda_gpu() if gpu is None else gpu  # False: add the settings a CPU-only machine needs
        cpus = usable_cpus() if cpus is None else cpus
        self.generic_env, self.cpu_env, self.cpu_args = launch_defaults(spec, self.layout, self.extra_args, os.environ, gpu, cpus)
        self.proc: subprocess.Popen | None = None
        self.startup_seconds: float | None = None
        self.ready_offset = 0  # the log's size when the engine became ready: later errors come from the probes
        self._socket_dir: str | None = None
        self.reference_kernels = reference_kernels  # loaded into the engine through its plugin entry points
        self._plugin_dir: str | None = None
        self.node_procs: list[subprocess.Popen] = []  # nodes 1.. of a multi-node server ("ranks")
        self.multinode = multinode_of(spec, gpu) if nodes > 1 else None
        ranks_nodes = self.multinode is not None and self.multinode.via == "ranks"
        self.node_ports = [free_port(spec.max_port) for _ in range(1, nodes)] if ranks_nodes else []
        self.node_bindings = self._node_bindings(cpus) if ranks_nodes and self.multinode.bind_per_node else {}
        if self.node_bindings:  # what node 0 runs with, as the report records it
            self.cpu_env[spec.thread_bind_env] = self.node_bindings[0]
        self.init_port = free_port(spec.max_port) if self.node_ports else None  # node 0's process-group port
        self.cluster = None  # the local Ray cluster of a multi-node server ("ray")
        self.reused = False  # handed to this run already up by a serving session (pool.py)
        if reference_kernels:  # required with the kernels: joined to the user's own list, never dropped for it
            self.generic_env.update({k: joined_list(os.environ.get(k), v) for k, v in reference_kernels.env.items()})

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def _node_bindings(self, cpus: list[int]) -> dict[int, str]:
        """Each node's own thread binding (its ranks on its share of the CPUs), where the workbench sets it."""
        var = self.spec.thread_bind_env
        if var is None or var not in self.cpu_env:
            return {}
        share = len(cpus) // self.nodes
        return {rank: thread_binding(self.layout.ranks // self.nodes, cpus[rank * share:(rank + 1) * share])
                for rank in range(self.nodes)}

    def argv(self, rank: int = 0) -> list[str]:
        """The command of node ``rank`` (0: the one that serves the API)."""
        s, multinode = self.spec, self.multinode
        entry = [a.format(plugins=PLUGINS) for a in multinode.entry] if multinode and multinode.entry else ["-m", s.module]
        argv = [self.python, *entry, *model_args(s, str(self.model))]
        if rank == 0 or multinode.follower_port:
            argv += [s.host_flag, HOST, s.port_flag, str(self.port if rank == 0 else self.node_ports[rank - 1])]
        if multinode:
            argv += node_flags(multinode, self.nodes, rank, HOST, self.init_port)
        for flag, size in ((s.tp_flag, self.tp), (s.pp_flag, self.layout.pp), (s.dp_flag, self.layout.dp)):
            if flag and size > 1:
                argv += [flag, str(size)]
        if self.adapters:
            lora = s.lora
            argv += [*([lora.enable_flag] if lora.enable_flag else []), lora.paths_flag,
                     *(f"{name}={path}" for name, path in self.adapters.items())]
            if self.lora_rank and lora.rank_flag:
                argv += [lora.rank_flag, str(self.lora_rank)]
        if s.max_len_flag and self.max_model_len:
            argv += [s.max_len_flag, str(self.max_model_len)]
        if s.dtype_flag and self.dtype:
            argv += [s.dtype_flag, self.dtype]
        if s.remote_code_flag and remote_code_trusted():
            argv.append(s.remote_code_flag)
        defaults = [x for flag, value in zip(s.args[::2], s.args[1::2]) if flag not in self.extra_args for x in (flag, value)]
        return argv + defaults + self.cpu_args + list(self.extra_args)

    def identity(self) -> tuple:
        """What makes two servers the same engine process for a client: every node's command with its ports
        left out, the variables set for it, where its guard records its group, and the files it serves as they
        are now (a kept engine never answers for bytes written after it loaded them)."""
        ports = {str(p): "{port}" for p in (self.port, self.init_port, *self.node_ports) if p is not None}
        commands = tuple(tuple(ports.get(a, a).replace(f"{HOST}:{self.init_port}", f"{HOST}:{{port}}") for a in self.argv(rank))
                         for rank in range(self.nodes if self.node_ports else 1))
        kernels = self.reference_kernels.label if self.reference_kernels else None
        served = _files_stamp([self.model, *self.adapters.values()])  # rewritten bytes are another engine's to serve
        return commands, tuple(sorted(self.applied_env.items())), kernels, str(self.groups_file), served

    def alive(self) -> bool:
        """Started and not exited (every node)."""
        return self.proc is not None and all(p.poll() is None for p in (self.proc, *self.node_procs))

    def pause(self) -> None:
        """Stop the engine's processes (SIGSTOP) while it waits for another run: an idle engine may spin (SGLang's
        scheduler takes a whole core). Each guard stays awake: it still takes the engine down if we die."""
        self._signal_engine(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal_engine(signal.SIGCONT)

    def _signal_engine(self, sig: int) -> None:
        for guard in (self.proc, *self.node_procs):
            if guard is not None and guard.poll() is None:
                signal_session(guard.pid, sig, spare=guard.pid)  # the guard leads its session: sid == its pid

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    @property
    def applied_env(self) -> dict[str, str]:
        """The variables the workbench set for this launch (the user's own environment is not repeated)."""
        return {**self.generic_env, **self.cpu_env}

    def environment(self) -> dict[str, str]:
        env = {**os.environ, **self.applied_env}
        if self.groups_file is not None:
            env[GUARD_RECORD_ENV] = str(self.groups_file)
        cache = workbench_home() / "cache" / self.spec.name
        for var, sub in self.spec.cache_env.items():
            env.setdefault(var, str(cache / sub))
        if self.spec.socket_dir_env:
            self._socket_dir = tempfile.mkdtemp(prefix=f"wb-{self.spec.name}-")
            env[self.spec.socket_dir_env] = self._socket_dir
        if self.reference_kernels:
            self._plugin_dir = plugin_folder(self.reference_kernels)
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
            self.port = self.port if self.port_given else free_port(self.spec.max_port)
            self.node_ports = [free_port(self.spec.max_port) for _ in self.node_ports]
            self.init_port = free_port(self.spec.max_port) if self.init_port is not None else None

    def _start_once(self) -> None:
        if port_in_use(self.port):
            raise BadInput(f"port {self.port} on {HOST} is already in use")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        env = self.environment()
        try:
            if self.multinode and self.multinode.via == "ray":
                env["RAY_ADDRESS"] = self._start_ray_cluster(env)
            self.proc = start_guarded(self.argv(), self.log_path, self._node_env(env, 0))
            self.node_procs = [start_guarded(self.argv(rank), self.node_log(rank), self._node_env(env, rank))
                               for rank in range(1, len(self.node_ports) + 1)]
        except OSError as exc:
            self.stop()
            raise EnvironmentProblem(f"{self.spec.name}: cannot start {self.python}: {exc}") from None
        try:
            self._wait_ready(t0)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = round(time.monotonic() - t0, 1)
        self.ready_offset = self.log_path.stat().st_size

    def _node_env(self, env: dict[str, str], rank: int) -> dict[str, str]:
        return {**env, self.spec.thread_bind_env: self.node_bindings[rank]} if self.node_bindings else env

    def node_log(self, rank: int) -> Path:
        return self.log_path.with_name(f"{self.log_path.stem}-node{rank}{self.log_path.suffix}")

    def _start_ray_cluster(self, env: dict[str, str]) -> str:
        """A Ray cluster of ``nodes`` local nodes in the engine's own Python, the CPUs split between them."""
        from ..raycluster import LocalRayCluster

        if subprocess.run([self.python, "-c", "import ray"], capture_output=True).returncode != 0:
            raise EnvironmentProblem(f"{self.spec.name}'s multi-node path runs over Ray, which its environment lacks: "
                                     f"{Path(self.python).parent / 'pip'} install ray")
        self.cluster = LocalRayCluster(self.python, self.nodes, max(1, len(usable_cpus()) // self.nodes), env)
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
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict, timeout: float = 120.0) -> dict:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())


def _files_stamp(paths: list[Path]) -> tuple:
    """Each file under ``paths`` with its size and modification time: what an engine loaded, cheaply."""
    files = [f for p in map(Path, paths) for f in ([p] if p.is_file() else sorted(p.rglob("*"))) if f.is_file()]
    return tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)


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
