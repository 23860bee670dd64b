#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite. Needs root: the tests ptrace, create
# pid namespaces and migrate real processes (they clean up everything they start).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# services the tests migrate (installed here; under CI=true their absence fails the run)
need=()
command -v memcached >/dev/null 2>&1 || need+=(memcached)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v nginx >/dev/null 2>&1 || need+=(nginx)
# PostgreSQL: whichever major version this Debian's `postgresql` gives (15 on 12, 17 on 13);
# its package has initdb, postgres and pgbench under /usr/lib/postgresql/N/bin. Its postinst
# creates a cluster "main" and would start it: the policy below keeps it stopped.
compgen -G '/usr/lib/postgresql/*/bin/pgbench' >/dev/null || need+=(postgresql)
if [ ${#need[@]} -gt 0 ]; then
  echo "test: installing ${need[*]} (apt; their system services are not started)"
  policy=/usr/sbin/policy-rc.d
  own_policy=0
  [ -e "$policy" ] || { printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod +x "$policy"; own_policy=1; }
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"; } \
    >/dev/null 2>&1 || {
      # under CI a missing service must fail the run, not pass it without its tests
      if [ -n "${CI:-}" ]; then echo "test: could not install ${need[*]} (needed under CI)" >&2; exit 1; fi
      echo "test: could not install ${need[*]}; their tests will be skipped"; }
  [ "$own_policy" = 1 ] && rm -f "$policy"
fi
exec .venv/bin/python -m pytest -q tests "$@"
