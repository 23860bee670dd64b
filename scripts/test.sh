#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite. Needs root: the tests ptrace, create
# pid namespaces and migrate real processes (they clean up everything they start).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# services the tests migrate (skipped by the tests if missing; installed here when possible)
if ! command -v memcached >/dev/null 2>&1; then
  echo "test: installing memcached (apt)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq memcached; } \
    >/dev/null 2>&1 || echo "test: memcached could not be installed; its test will be skipped"
fi
exec .venv/bin/python -m pytest -q tests "$@"
