#!/usr/bin/env bash
# keypal benchmark: builds keypal (release), starts a private cluster at PostgreSQL's default
# durability (fsync and synchronous_commit on, as production runs), loads 1 100 000 keys and
# runs pgbench (-M prepared, the same clients and duration for every script, in one run):
#   md5            SELECT md5(key expression): the limit, one call carrying a key
#   inline         hand-written pgcrypto sha256 lookup in a plain table, with the same checks
#   verify_spread  SELECT keypal_verify(key, 'read') over 100 000 keys
#   verify_hot     SELECT keypal_verify(key, 'read') on one hot key
#   verify_from    SELECT * FROM keypal_verify(key, 'read') (the same, expanded by a FROM-clause
#                  function scan, which costs PostgreSQL a tuplestore per call)
#   touch_spread   verify_spread with last_used_resolution = 0: every verify is a first touch
#                  of its key (recorded in shared memory, written behind by the flush worker)
#   rl_spread, rl_hot  verify_spread / verify_hot with a default rate limit in force: every
#                  verify counts in its key's shared window
#   rl_1m          rl_spread over 1 000 000 keys (a million live windows)
#   quota_spread, quota_hot  the same over 100 000 other keys, which have a (never reached)
#                  quota: every verify counts, and the worker writes the counts behind
# Every script runs BENCH_ROUNDS times, the rounds interleaved (so drift in the machine's
# speed hits all scripts alike); it prints each script's median tps and the ratios of the
# medians to md5, inline and verify_spread, then the Node client bench (bench/client) if
# node is installed.
#   BENCH_CLIENTS (default 2), BENCH_SECONDS (default 10), BENCH_ROUNDS (default 3),
#   BENCH_PRELOAD=1 (keypal in shared_preload_libraries: one behaviour, the root of the
#   shared state placed at start)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
CLIENTS=${BENCH_CLIENTS:-2}
SECONDS_EACH=${BENCH_SECONDS:-10}
ROUNDS=${BENCH_ROUNDS:-3}
DIR=/tmp/keypal-bench
PORT=${BENCH_PORT:-55441}

bash scripts/setup.sh
cargo pgrx install --release --pg-config /usr/lib/postgresql/15/bin/pg_config >/dev/null
export PGHOST=$DIR PGPORT=$PORT PGUSER=postgres PGDATABASE=keypal_bench
trap 'bash scripts/cluster.sh stop "$DIR"' EXIT

declare -A tps
run() {  # run NAME SCRIPT: appends this round's tps to tps[NAME]
    out=$(pgbench -n -M prepared -c "$CLIENTS" -j "$CLIENTS" -T "$SECONDS_EACH" -f "bench/$2.sql" keypal_bench 2>&1)
    tps[$1]="${tps[$1]:-} $(echo "$out" | sed -n 's/^tps = \([0-9.]*\).*/\1/p')"
}
median() { tr ' ' '\n' <<<"$1" | grep . | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
setting() { psql -X -q -c "$1" >/dev/null; }
rate_limit() { setting "SELECT keypal_configure(rate_limit => '$1')"; }
RL='{"requests": 1000000000, "window": "1h"}'

bash scripts/cluster.sh stop "$DIR" 2>/dev/null || true
rm -rf "$DIR"
preload=""
[ "${BENCH_PRELOAD:-0}" = 1 ] && preload="shared_preload_libraries = 'keypal'"
# (cluster.sh turns fsync off for test clusters; a later line wins.)
bash scripts/cluster.sh start "$DIR" "$PORT" "shared_buffers = '1GB'" "$preload" \
    "fsync = on" "synchronous_commit = on"
psql -X -q -d postgres -c "CREATE DATABASE keypal_bench"
echo "loading 1 100 000 keys ..."
psql -X -q -v ON_ERROR_STOP=1 -f bench/setup.sql >/dev/null
# A million live rate windows (made once: a window lasts its hour).
rate_limit "$RL"
psql -X -q -At -c "SELECT count(*) FILTER (WHERE (keypal_verify('k' || lpad(n::text, 31, '0'))).valid) FROM generate_series(1, 1000000) n" >/dev/null
rate_limit null
shm() { psql -X -At -c "SELECT value FROM keypal_stats() WHERE name = '$1'"; }
# Steady state: the flush worker has written the warm-up's 1 100 000 first uses.
t0=$(date +%s)
while [ "$(shm shared_queued)" != 0 ]; do sleep 1; done
echo "the flush worker wrote 1 100 000 first uses in about $(( $(date +%s) - t0 )) s after the warm-up"
psql -X -q -c "VACUUM ANALYZE keypal.keys" -c "CHECKPOINT"
echo "shared entries: $(shm shared_entries) x $(shm shared_entry_bytes) bytes (accounted); /dev/shm holds $(du -sm /dev/shm | cut -f1) MB"

for round in $(seq "$ROUNDS"); do
    for s in md5 inline verify_spread verify_hot verify_from quota_spread quota_hot; do
        run "$s" "$s"
    done
    rate_limit "$RL"
    run rl_spread verify_spread
    run rl_hot verify_hot
    run rl_1m verify_1m
    rate_limit null
    setting "SELECT keypal_configure(last_used_resolution => '0s')"
    run touch_spread verify_spread
    setting "SELECT keypal_configure(last_used_resolution => '1h')"
    echo "round $round done"
done
declare -A med
for s in "${!tps[@]}"; do med[$s]=$(median "${tps[$s]}"); done
echo
printf '%-14s %10s %8s %8s %8s   %s\n' "script" "tps" "/md5" "/inline" "/verify" "(each round)"
for s in md5 inline verify_spread verify_hot verify_from touch_spread rl_spread rl_hot rl_1m quota_spread quota_hot; do
    awk -v s="$s" -v t="${med[$s]}" -v m="${med[md5]}" -v i="${med[inline]}" -v v="${med[verify_spread]}" -v r="${tps[$s]}" \
        'BEGIN { printf "%-14s %10.0f %8.2f %8.2f %8.2f  %s\n", s, t, t / m, t / i, t / v, r }'
done
awk -v a="${med[rl_1m]}" -v b="${med[rl_spread]}" 'BEGIN { printf "rl_1m / rl_spread (1 000 000 vs 100 000 rate-limited keys): %.2f\n", a / b }'
awk -v a="${med[rl_hot]}" -v b="${med[verify_hot]}" 'BEGIN { printf "rl_hot / verify_hot: %.2f\n", a / b }'
awk -v a="${med[quota_hot]}" -v b="${med[verify_hot]}" 'BEGIN { printf "quota_hot / verify_hot: %.2f\n", a / b }'
echo "(clients=$CLIENTS, ${SECONDS_EACH}s x $ROUNDS rounds each, medians;" \
     "fsync=$(psql -X -At -c 'SHOW fsync')," \
     "synchronous_commit=$(psql -X -At -c 'SHOW synchronous_commit')," \
     "shared_preload_libraries='$(psql -X -At -c 'SHOW shared_preload_libraries')')"
echo "shared entries now: $(shm shared_entries); /dev/shm: $(du -sm /dev/shm | cut -f1) MB"
echo "targets: verify_spread >= 1.0x inline and >= 0.6x md5; rl_spread and quota_spread >= 0.9x verify_spread; rl_1m >= 0.9x rl_spread"
if command -v node >/dev/null && command -v npm >/dev/null; then
    echo
    (cd bench/client && npm install --silent --no-audit --no-fund >/dev/null 2>&1) \
        && node bench/client/bench.js "$SECONDS_EACH" "$ROUNDS" \
        || echo "client bench: could not install the pg package (npm)"
fi
