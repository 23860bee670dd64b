#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the live-migration demo: a bundled self-checking workload is
# migrated with pre-restore and with cold restore; prints both downtimes side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
