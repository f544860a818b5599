#!/usr/bin/env bash
# The main job end to end on the embedded default: the release of the project's own trained fixture model
# and LoRA adapter (built from the Python standard library's source text, cached after the first run),
# as examples/fixture-release.yaml says: merge -> FP8-static + INT8 W8A8 + GGUF Q8_0 -> verify on vLLM and
# SGLang (TP=1 and TP=2) and llama.cpp. Outputs, model cards and reports land in ./out/release; a second run
# finds every stage cached. Extra arguments go to `workbench release` (e.g. --dry-run, --force, -q).
# On a fresh machine the fixtures train while the engines install (scripts/setup.sh --fixtures main).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --fixtures main
WORKBENCH_FIXTURES=$(.venv/bin/python scripts/fixtures.py --path)
export WORKBENCH_FIXTURES
exec .venv/bin/workbench release examples/fixture-release.yaml "$@"
