#!/usr/bin/env bash
# The whole test suite, engine tests included: installs what it needs first (scripts/setup.sh), builds
# the fixtures on first use (cached), then runs pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
