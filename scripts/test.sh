#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite. Needs root: the tests ptrace, create
# pid namespaces and migrate real processes (they clean up everything they start).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/python -m pytest -q tests "$@"
