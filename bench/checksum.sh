#!/usr/bin/env bash
# Scannable keys bench: keypal (release) in a private cluster at PostgreSQL's default
# durability, keypal_configure(checksum => true), 100 000 keys; pgbench -M prepared,
# BENCH_CLIENTS (2) clients, BENCH_SECONDS (10) s each, one after the other:
#   valid        keypal_verify of a key that exists (the baseline)
#   unknown      a key of the right shape and checksum that does not exist (a lookup that misses)
#   bad_checksum a key of that shape whose checksum is wrong (refused without a lookup)
# and prints tps and the ratios to valid.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
CLIENTS=${BENCH_CLIENTS:-2}
SECONDS_EACH=${BENCH_SECONDS:-10}
DIR=/tmp/keypal-bench-checksum
bench_cluster "$DIR" "${BENCH_PORT:-55446}" keypal_checksum_bench
work=$(mktemp -d)
trap 'bash scripts/cluster.sh stop "$DIR"; rm -rf "$work"' EXIT
psql -X -q -c "CREATE EXTENSION keypal" -c "SELECT keypal_configure(prefix => 'sk_', checksum => true)" >/dev/null
psql -X -q -c "SELECT count(*) FROM keypal_create_many((SELECT jsonb_agg(jsonb_build_object('owner_id', 'b' || i)) FROM generate_series(1, 1000) i)), generate_series(1, 100)" >/dev/null
key=$(psql -X -q -At -c "SELECT key FROM keypal_create(owner_id => 'bench')")
unknown=$(psql -X -q -At -c "SELECT 'sk_' || r || keypal.key_checksum('sk_' || r, 'A-Za-z0-9') FROM (SELECT repeat('Q', 32) AS r) x")
bad="${key:0:${#key}-1}$( [ "${key: -1}" = A ] && echo B || echo A )"
[ "$(psql -X -q -At -c "SELECT error_code FROM keypal_verify('$bad')")" = INVALID_FORMAT ] || { echo "bad key not refused" >&2; exit 1; }
[ "$(psql -X -q -At -c "SELECT error_code FROM keypal_verify('$unknown')")" = INVALID_KEY ] || { echo "unknown key not INVALID_KEY" >&2; exit 1; }
echo "SELECT keypal_verify('$key');" >"$work/valid.sql"
echo "SELECT keypal_verify('$unknown');" >"$work/unknown.sql"
echo "SELECT keypal_verify('$bad');" >"$work/bad_checksum.sql"
declare -A tps
for s in valid unknown bad_checksum; do
    tps[$s]=$(pgbench -n -M prepared -c "$CLIENTS" -j "$CLIENTS" -T "$SECONDS_EACH" -f "$work/$s.sql" 2>&1 |
              sed -n 's/^tps = \([0-9.]*\).*/\1/p')
done
printf '%-13s %12s %8s\n' verify tps ratio
for s in valid unknown bad_checksum; do
    awk -v s="$s" -v t="${tps[$s]}" -v base="${tps[valid]}" 'BEGIN { printf "%-13s %12.0f %7.2fx\n", s, t, t / base }'
done
