#!/usr/bin/env bash
# The whole test suite, engine tests included: installs what it needs first (scripts/setup.sh), builds
# the fixtures (cached), then runs pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --no-engines
# On a fresh machine the fixtures train (CPU) while the engines download and install (mostly network and
# disk): ~15 minutes saved. A build that fails here is retried, and reported, by the first test that needs it.
mkdir -p out
log=out/fixtures-build.log
(.venv/bin/python scripts/fixtures.py && .venv/bin/python scripts/families.py all) > "$log" 2>&1 &
fixtures=$!
scripts/setup.sh
wait "$fixtures" || echo "[test] building the fixtures failed (log: $log); the tests will retry" >&2
exec .venv/bin/python -m pytest "$@"
