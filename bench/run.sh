#!/usr/bin/env bash
# keypal benchmark: builds keypal (release), starts a private cluster, loads 100 000 keys and
# runs pgbench (-M prepared, the same clients and duration for every script, in one run):
#   md5            SELECT md5(key expression): the limit, one call carrying a key
#   inline         hand-written pgcrypto sha256 lookup in a plain table, with the same checks
#   verify_spread  SELECT keypal_verify(key, 'read') over 100 000 keys
#   verify_hot     SELECT keypal_verify(key, 'read') on one hot key
#   verify_from    SELECT * FROM keypal_verify(key, 'read') (the same, expanded by a FROM-clause
#                  function scan, which costs PostgreSQL a tuplestore per call)
#   rl_spread, rl_hot  verify_spread / verify_hot with a default rate limit in force
# and prints each tps and the ratios to md5 and inline.
#   BENCH_CLIENTS (default 2), BENCH_SECONDS (default 15)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
CLIENTS=${BENCH_CLIENTS:-2}
SECONDS_EACH=${BENCH_SECONDS:-15}
DIR=/tmp/keypal-bench
PORT=${BENCH_PORT:-55441}

bash scripts/setup.sh
cargo pgrx install --release --pg-config /usr/lib/postgresql/15/bin/pg_config >/dev/null
bash scripts/cluster.sh stop "$DIR" 2>/dev/null || true
rm -rf "$DIR"
bash scripts/cluster.sh start "$DIR" "$PORT" "shared_buffers = '256MB'"
trap 'bash scripts/cluster.sh stop "$DIR"' EXIT
export PGHOST=$DIR PGPORT=$PORT PGUSER=postgres
psql -X -q -d postgres -c "CREATE DATABASE keypal_bench"
psql -X -q -v ON_ERROR_STOP=1 -d keypal_bench -f bench/setup.sql >/dev/null

declare -A tps
run() {  # run NAME SCRIPT
    out=$(pgbench -n -M prepared -c "$CLIENTS" -j "$CLIENTS" -T "$SECONDS_EACH" -f "bench/$2.sql" keypal_bench 2>&1)
    tps[$1]=$(echo "$out" | sed -n 's/^tps = \([0-9.]*\).*/\1/p')
    printf '%-14s %10.0f tps\n' "$1" "${tps[$1]}"
}
for s in md5 inline verify_spread verify_hot verify_from; do
    run "$s" "$s"
done
# The same verifies with a (never reached) default rate limit: every verify now counts in
# keypal.rate_state (the table-backed limiter), a write per verify.
psql -X -q -d keypal_bench -c "SELECT keypal_configure(rate_limit => '{\"requests\": 1000000000, \"window\": \"1h\"}')" >/dev/null
run rl_spread verify_spread
run rl_hot verify_hot
echo
printf '%-14s %8s %8s\n' "script" "/md5" "/inline"
for s in inline verify_spread verify_hot verify_from rl_spread rl_hot; do
    awk -v s="$s" -v t="${tps[$s]}" -v m="${tps[md5]}" -v i="${tps[inline]}" 'BEGIN { printf "%-14s %8.2f %8.2f\n", s, t / m, t / i }'
done
echo "(clients=$CLIENTS, ${SECONDS_EACH}s each, 100000 keys; targets: verify >= 1.0x inline, >= 0.8x md5)"
