#!/usr/bin/env bash
# The main job end to end on the embedded default: the project's own trained fixture model and LoRA
# adapter (built from the Python standard library's source text, cached after the first run).
# Outputs land in ./out.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --no-engines
fixtures=$(.venv/bin/python scripts/fixtures.py --path)
.venv/bin/python scripts/fixtures.py
mkdir -p out
.venv/bin/workbench merge "$fixtures/llama" "$fixtures/llama-lora" --out out/llama-lora-merged --force
