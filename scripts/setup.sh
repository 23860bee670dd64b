#!/usr/bin/env bash
# Set up prerestore on a fresh Debian 12 or 13 machine (run as root): the C toolchain and Python
# headers from apt when missing, then a virtualenv in .venv with prerestore installed editable
# (which builds the native module and the husk). Idempotent; prints where it is.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

need_apt=()
command -v cc >/dev/null 2>&1 || need_apt+=(gcc libc6-dev)
inc=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
[ -f "$inc/Python.h" ] || need_apt+=(python3-dev)
"$PY" -m venv --help >/dev/null 2>&1 && "$PY" -c 'import ensurepip' 2>/dev/null || need_apt+=(python3-venv)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]} (apt)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $("$PY" --version)"
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
echo "setup: installing prerestore (builds native/ and the husk)"
.venv/bin/python -m pip install -q -e ".[test]" 2>&1 | grep -v -i "warning: running pip as" || true
.venv/bin/python -c "import prerestore._native" || { echo "setup: native module failed to build" >&2; exit 1; }
echo "setup: ready: .venv/bin/prerestore"
