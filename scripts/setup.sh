#!/usr/bin/env bash
# Installs the workbench into ./.venv and, through `workbench engines install`, the serving engines into
# their own environments under $WORKBENCH_HOME/engines (default ~/.cache/workbench). Idempotent: a
# finished environment is kept.
#   scripts/setup.sh            workbench + vLLM + SGLang + llama.cpp
#   scripts/setup.sh --no-engines
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

log() { printf '[setup] %s\n' "$*" >&2; }
# pip, without the warnings about this machine's unused mirror folders
pip_q() { "$@" 2> >(grep -v "^WARNING: Location" >&2); }

engines=1
for arg in "$@"; do
  case "$arg" in
    --no-engines) engines=0 ;;
    *) echo "usage: scripts/setup.sh [--no-engines]" >&2; exit 2 ;;
  esac
done
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# torch 2.13.0 is pinned everywhere: a looser spec pulls the registry's CUDA build (several GB)
pip_q .venv/bin/pip install -q "torch==2.13.0"
pip_q .venv/bin/pip install -q -e ".[test]"
log "workbench: $(.venv/bin/workbench --version)"
if [ "$engines" = 1 ]; then
  # llama.cpp compiles from the sdist for this CPU: ~12 minutes on 2 cores the first time, then pip's
  # wheel cache makes it quick. LMDeploy serves on NVIDIA GPUs only: without one it gets only what its
  # command-line parser needs (~2 minutes), so the tests check its command lines with its own parser.
  .venv/bin/workbench engines install vllm sglang llamacpp lmdeploy
fi
