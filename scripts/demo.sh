#!/usr/bin/env bash
# The main job end to end on the embedded default: the project's own trained fixture model and LoRA
# adapter (built from the Python standard library's source text, cached after the first run):
# merge -> GGUF (F16, Q8_0, Q4_K_M) -> verify the merged model on vLLM and the GGUF on llama.cpp.
# Outputs and reports land in ./out.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/python scripts/fixtures.py
fixtures=$(.venv/bin/python scripts/fixtures.py --path)
wb=.venv/bin/workbench
mkdir -p out
$wb merge "$fixtures/llama" "$fixtures/llama-lora" --out out/llama-lora-merged --force
$wb convert gguf out/llama-lora-merged --outtype f16,q8_0,q4_k_m --out out --force
$wb verify out/llama-lora-merged --server vllm --tp 1 --extra-arg=--enforce-eager --report out/verify-vllm
$wb verify out/llama-lora-merged-Q8_0.gguf --server llamacpp --report out/verify-llamacpp
