#!/usr/bin/env bash
# The whole test suite, engine tests included: installs what it needs first (scripts/setup.sh: the
# engines install while every fixture trains beside them), then runs pytest. Extra arguments go to pytest:
#   scripts/test.sh                   everything (what CI runs)
#   scripts/test.sh -m "not slow"     the fast loop: no fixture training beyond the cached ones, no engine
#   scripts/test.sh tests/test_verify.py -k chat
# Each phase's seconds go to $WORKBENCH_PHASES when that is set (.ci/run prints them as a table).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --fixtures all
start=$SECONDS
set +e
# two pytest-xdist workers, each taking whole test files, the longest first (tests/conftest.py); an engine
# start-up that loses its port to the other worker's engine is redone on a new port (verify/launch.py).
# WORKBENCH_TEST_WORKERS=0 runs everything in this one process
.venv/bin/python -m pytest -n "${WORKBENCH_TEST_WORKERS:-2}" --dist loadfile "$@"
code=$?
set -e
[ -z "${WORKBENCH_PHASES:-}" ] || printf 'tests (pytest)\t%s\n' $((SECONDS - start)) >> "$WORKBENCH_PHASES"
exit $code
