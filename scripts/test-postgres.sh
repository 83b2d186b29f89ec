#!/usr/bin/env bash
# A throwaway PostgreSQL server on 127.0.0.1 for the shared-study tests (tests/autotune/test_workers.py).
#   eval "$(bash scripts/test-postgres.sh start)"    # exports TINYPALLAS_TEST_POSTGRES (the URL) and
#                                                    # TINYPALLAS_TEST_POSTGRES_DIR (data, socket, log)
#   bash scripts/test-postgres.sh stop "$TINYPALLAS_TEST_POSTGRES_DIR"
# Needs Debian's `postgresql` package (.ci/run installs it). The server runs as the `postgres` user
# when started by root, with trust authentication on 127.0.0.1 only, on the first free port from 55432.
set -euo pipefail

bin_dir() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1; }
as_owner() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

case "${1:-}" in
start)
  BIN=$(bin_dir)
  if [ -z "$BIN" ]; then
    echo "no PostgreSQL server binaries under /usr/lib/postgresql; apt-get install postgresql" >&2
    exit 1
  fi
  port=55432
  while (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do port=$((port + 1)); done
  dir=$(mktemp -d /tmp/tinypallas-postgres.XXXXXX)
  if [ "$(id -u)" = 0 ]; then chown postgres "$dir"; fi
  as_owner "$BIN/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 >"$dir/initdb.log" 2>&1
  as_owner "$BIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
    -o "-h 127.0.0.1 -p $port -k $dir -c max_connections=200" start >/dev/null
  as_owner "$BIN/createdb" -h 127.0.0.1 -p "$port" -U postgres tinypallas_test
  echo "export TINYPALLAS_TEST_POSTGRES=postgresql://postgres@127.0.0.1:$port/tinypallas_test"
  echo "export TINYPALLAS_TEST_POSTGRES_DIR=$dir"
  ;;
stop)
  dir=${2:?usage: $0 stop DIR}
  BIN=$(bin_dir)
  as_owner "$BIN/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null || true
  rm -rf "$dir"
  ;;
*)
  echo "usage: $0 start | stop DIR" >&2
  exit 2
  ;;
esac
