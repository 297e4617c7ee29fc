#!/usr/bin/env bash
# Durability: usage and quota counts of committed verifies survive a crash
# (pg_ctl stop -m immediate); after the restart verify works at once.
source "$(dirname "$0")/lib.sh"

PGBIN=/usr/lib/postgresql/15/bin
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

read -r id key < <(q -F ' ' -c "SELECT id, key FROM keypal_create(owner_id => 'crash', quota => '{\"limit\": 1000, \"period\": \"day\"}')")
for _ in $(seq 25); do echo "SELECT (keypal_verify('$key')).valid;"; done | q >/dev/null
q -c "SELECT keypal_track_usage('$id', endpoint => '/x', tokens => 7, requests => 5)" >/dev/null

as_pg "$PGBIN/pg_ctl" -D "$PGHOST" -m immediate stop >/dev/null
as_pg "$PGBIN/pg_ctl" -D "$PGHOST" -l "$PGHOST/server.log" -w start >/dev/null

is "$(q -c "SELECT used || ' ' || tokens FROM keypal_usage('$id')")" "30 7" "after a crash: 25 verifies + 5 tracked requests and 7 tokens, nothing lost"
is "$(q -c "SELECT valid FROM keypal_verify('$key')")" t "verify works right after the restart"
done_testing
