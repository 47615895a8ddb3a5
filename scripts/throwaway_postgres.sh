#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for autofit workers (initdb refuses root: run as postgres).
# Usage: bash scripts/throwaway_postgres.sh start DIR [PORT]   -> prints the storage URL
#        bash scripts/throwaway_postgres.sh stop DIR            -> stops it and removes DIR
set -euo pipefail
cmd="${1:?start|stop}"; dir="${2:?a directory for the cluster}"; port="${3:-54329}"
bin="$(dirname "$(command -v initdb || ls -d /usr/lib/postgresql/*/bin/initdb | tail -1)")"
as_pg=()
if [ "$(id -u)" = 0 ]; then as_pg=(runuser -u postgres --); fi
case "$cmd" in
  start)
    mkdir -p "$dir/sock"
    if [ "$(id -u)" = 0 ]; then chmod 755 "$dir"; chown postgres "$dir" "$dir/sock"; fi
    "${as_pg[@]}" "$bin/initdb" -D "$dir/data" -U postgres -A trust >/dev/null
    "${as_pg[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/log" \
        -o "-k $dir/sock -p $port -c listen_addresses=127.0.0.1" -w start >/dev/null
    echo "postgresql+psycopg://postgres@127.0.0.1:$port/postgres"
    ;;
  stop)
    "${as_pg[@]}" "$bin/pg_ctl" -D "$dir/data" -m fast stop >/dev/null || true
    rm -rf "$dir"
    ;;
  *) echo "usage: $0 start|stop DIR [PORT]" >&2; exit 2 ;;
esac
