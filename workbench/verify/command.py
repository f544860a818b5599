"""What starting an engine runs, worked out without starting anything: each node's command line, the variables
the workbench sets (only where the user's environment does not), the ports, per-node core bindings, and the
identity a serving session matches running servers by. verify/launch.py's Server runs it."""

from __future__ import annotations

import os
from pathlib import Path

from ..engines import (EngineSpec, Layout, ReferenceKernels, engine_python, has_cuda_gpu, launch_defaults, model_args,
                       multinode_of, node_flags, thread_binding, usable_cpus)
from ..process import HOST, free_port
from ..safety import remote_code_trusted

PLUGINS = Path(__file__).resolve().parents[1] / "engine_plugins"


class EngineCommand:
    """One engine launch as data: ``argv(rank)`` for each node, ``applied_env`` (what the workbench adds),
    ``identity()``. ``gpu`` and ``cpus`` are the machine's facts (default: this machine's), so a command for
    another machine can be built and checked here; ``port`` None picks a free one."""

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
        self.max_model_len = max_model_len
        self.dtype = dtype
        self.extra_args = tuple(extra_args)
        gpu = has_cuda_gpu() if gpu is None else gpu  # False: add the settings a CPU-only machine needs
        cpus = usable_cpus() if cpus is None else cpus
        self.generic_env, self.cpu_env, self.cpu_args = launch_defaults(spec, self.layout, self.extra_args, os.environ, gpu, cpus)
        self.reference_kernels = reference_kernels  # loaded into the engine through its plugin entry points
        self.multinode = multinode_of(spec, gpu) if nodes > 1 else None
        ranks_nodes = self.multinode is not None and self.multinode.via == "ranks"
        self.node_ports = [free_port(spec.max_port) for _ in range(1, nodes)] if ranks_nodes else []
        self.node_bindings = self._node_bindings(cpus) if ranks_nodes and self.multinode.bind_per_node else {}
        if self.node_bindings:  # what node 0 runs with, as the report records it
            self.cpu_env[spec.thread_bind_env] = self.node_bindings[0]
        self.init_port = free_port(spec.max_port) if self.node_ports else None  # node 0's process-group port
        if reference_kernels:  # required with the kernels: joined to the user's own list, never dropped for it
            self.generic_env.update({k: joined_list(os.environ.get(k), v) for k, v in reference_kernels.env.items()})

    @property
    def url(self) -> str:
        """The base URL of the engine's HTTP API (node 0's port, on the local host)."""
        return f"http://{HOST}:{self.port}"

    @property
    def applied_env(self) -> dict[str, str]:
        """The variables the workbench set for this launch (the user's own environment is not repeated)."""
        return {**self.generic_env, **self.cpu_env}

    def _node_bindings(self, cpus: list[int]) -> dict[int, str]:
        """Each node's own thread binding (its ranks on its share of the CPUs), where the workbench sets it."""
        var = self.spec.thread_bind_env
        if var is None or var not in self.cpu_env:
            return {}
        share = len(cpus) // self.nodes
        return {rank: thread_binding(self.layout.ranks // self.nodes, cpus[rank * share:(rank + 1) * share])
                for rank in range(self.nodes)}

    def node_env(self, env: dict[str, str], rank: int) -> dict[str, str]:
        """``env`` with node ``rank``'s own core binding, where nodes are bound one by one."""
        return {**env, self.spec.thread_bind_env: self.node_bindings[rank]} if self.node_bindings else env

    def choose_new_ports(self) -> None:
        """New free ports (the API's unless the user named it, the other nodes', the process group's): after a
        start-up lost a port to another process."""
        self.port = self.port if self.port_given else free_port(self.spec.max_port)
        self.node_ports = [free_port(self.spec.max_port) for _ in self.node_ports]
        self.init_port = free_port(self.spec.max_port) if self.init_port is not None else None

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
        """What makes two launches the same engine process for a client: every node's command with its ports
        left out, the variables set for it, the kernels, and the files it serves as they are now (a kept engine
        never answers for bytes written after it loaded them)."""
        ports = {str(p): "{port}" for p in (self.port, self.init_port, *self.node_ports) if p is not None}
        commands = tuple(tuple(ports.get(a, a).replace(f"{HOST}:{self.init_port}", f"{HOST}:{{port}}") for a in self.argv(rank))
                         for rank in range(self.nodes if self.node_ports else 1))
        kernels = self.reference_kernels.label if self.reference_kernels else None
        served = _files_stamp([self.model, *self.adapters.values()])  # rewritten bytes are another engine's to serve
        return commands, tuple(sorted(self.applied_env.items())), kernels, served


def joined_list(user: str | None, ours: str) -> str:
    """A comma-separated list setting (e.g. VLLM_DISABLED_KERNELS): the user's items, then ours not among them."""
    items = [i for i in (user or "").split(",") if i]
    return ",".join(items + [i for i in ours.split(",") if i not in items])


def _files_stamp(paths: list[Path]) -> tuple:
    """Each file under ``paths`` with its size and modification time: what an engine loaded, cheaply."""
    files = [f for p in map(Path, paths) for f in ([p] if p.is_file() else sorted(p.rglob("*"))) if f.is_file()]
    return tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
