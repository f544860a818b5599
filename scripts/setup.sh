#!/usr/bin/env bash
# Installs the workbench into ./.venv and, through `workbench engines install`, the serving engines into
# their own environments under $WORKBENCH_HOME/engines (default ~/.cache/workbench), while the fixtures
# train beside them. Idempotent: a finished environment and built fixtures are kept.
#   scripts/setup.sh                      workbench + vLLM + SGLang + llama.cpp (+ LMDeploy's parser)
#   scripts/setup.sh --no-engines         the workbench only
#   scripts/setup.sh --fixtures main|all  also build the fixtures (main: the release's; all: every family's)
# Each phase's seconds go to $WORKBENCH_PHASES (a file, "name<TAB>seconds" lines) when that is set.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

log() { printf '[setup] %s\n' "$*" >&2; }
# pip, without the warnings about this machine's unused mirror folders
pip_q() { "$@" 2> >(grep -v "^WARNING: Location" >&2); }
phase() { [ -z "${WORKBENCH_PHASES:-}" ] || printf '%s\t%s\n' "$1" "$2" >> "$WORKBENCH_PHASES"; }

engines=1
fixtures=none
while [ $# -gt 0 ]; do
  case "$1" in
    --no-engines) engines=0 ;;
    --fixtures) fixtures=${2:-}; shift ;;
    *) echo "usage: scripts/setup.sh [--no-engines] [--fixtures main|all]" >&2; exit 2 ;;
  esac
  shift
done
case "$fixtures" in none|main|all) ;; *) echo "setup.sh: --fixtures takes main or all" >&2; exit 2 ;; esac

t0=$SECONDS
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# torch 2.13.0 is pinned everywhere: a looser spec pulls the registry's CUDA build (several GB)
pip_q .venv/bin/pip install -q "torch==2.13.0"
pip_q .venv/bin/pip install -q -e ".[test]"
log "workbench: $(.venv/bin/workbench --version)"
phase "workbench install" $((SECONDS - t0))

# The fixtures train on the CPU while the engines download and install (mostly network and disk); on a
# fresh machine that overlap saves the whole training time. A failed build is reported here and retried
# by whatever needs the fixtures next (the first test, the demo).
pid=""
if [ "$fixtures" != none ]; then
  mkdir -p out
  fixture_log=out/fixtures-build.log
  (
    start=$SECONDS
    .venv/bin/python scripts/fixtures.py
    [ "$fixtures" = main ] || .venv/bin/python scripts/families.py all
    phase "fixtures ($fixtures, beside the engines)" $((SECONDS - start))
  ) > "$fixture_log" 2>&1 &
  pid=$!
  log "building the fixtures in the background (log: $fixture_log)"
fi
if [ "$engines" = 1 ]; then
  t1=$SECONDS
  # llama.cpp compiles from the sdist for this CPU (~12 minutes on 2 cores), so it installs beside the
  # others, which mostly download and unpack (each engine has its own folder). LMDeploy serves on NVIDIA
  # GPUs only: without one it gets only what its command-line parser needs (~2 minutes), so the tests check
  # its command lines with its own parser.
  mkdir -p out
  # Beside the fixtures' training the installs run niced: training is the longer of the two (demo: 749 s against
  # ~600 s of installs on a fresh 2-core machine), and its threads lose time whenever one is descheduled.
  nice=()
  [ -z "$pid" ] || nice=(nice -n 10)
  "${nice[@]}" .venv/bin/workbench engines install llamacpp > out/llamacpp-install.log 2>&1 &
  llamacpp_pid=$!
  "${nice[@]}" .venv/bin/workbench engines install vllm sglang lmdeploy
  if ! wait "$llamacpp_pid"; then
    cat out/llamacpp-install.log >&2
    exit 1
  fi
  cat out/llamacpp-install.log >&2
  phase "engine installs" $((SECONDS - t1))
fi
if [ -n "$pid" ]; then
  t2=$SECONDS
  if ! wait "$pid"; then
    log "building the fixtures failed (log: $fixture_log); they are retried where they are needed"
  fi
  phase "fixtures, waited for after the installs" $((SECONDS - t2))
fi
