#!/usr/bin/env bash
# keypal benchmark: builds keypal (release), starts a private cluster, loads 200 000 keys and
# runs pgbench (-M prepared, the same clients and duration for every script, in one run):
#   md5            SELECT md5(key expression): the limit, one call carrying a key
#   inline         hand-written pgcrypto sha256 lookup in a plain table, with the same checks
#   verify_spread  SELECT keypal_verify(key, 'read') over 100 000 keys
#   verify_hot     SELECT keypal_verify(key, 'read') on one hot key
#   verify_from    SELECT * FROM keypal_verify(key, 'read') (the same, expanded by a FROM-clause
#                  function scan, which costs PostgreSQL a tuplestore per call)
#   rl_spread, rl_hot  verify_spread / verify_hot with a default rate limit in force
#   touch_spread   verify_spread with last_used_resolution = 0: every verify is a first touch
#                  of its key (today: a last_used_at write and its commit's WAL flush)
#   quota_spread, quota_hot  the same over the other 100 000 keys, which have a (never
#                  reached) quota: every verify counts
# Every script runs BENCH_ROUNDS times, the rounds interleaved (so drift in the machine's
# speed hits all scripts alike); it prints each script's median tps and the ratios of the
# medians to md5, inline and verify_spread. It does all of this twice: without and with
# shared_preload_libraries = 'keypal' (BENCH_MODES). The clusters run with PostgreSQL's
# default durability (fsync and synchronous_commit on), as production does.
#   BENCH_CLIENTS (default 2), BENCH_SECONDS (default 10), BENCH_ROUNDS (default 3),
#   BENCH_MODES (default "plain preload")
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
export PGHOST=$DIR PGPORT=$PORT PGUSER=postgres
trap 'bash scripts/cluster.sh stop "$DIR"' EXIT

declare -A tps
run() {  # run NAME SCRIPT: appends this round's tps to tps[NAME]
    out=$(pgbench -n -M prepared -c "$CLIENTS" -j "$CLIENTS" -T "$SECONDS_EACH" -f "bench/$2.sql" keypal_bench 2>&1)
    tps[$1]="${tps[$1]:-} $(echo "$out" | sed -n 's/^tps = \([0-9.]*\).*/\1/p')"
}
median() { tr ' ' '\n' <<<"$1" | grep . | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
setting() { psql -X -q -d keypal_bench -c "$1" >/dev/null; }

for mode in ${BENCH_MODES:-plain preload}; do
    bash scripts/cluster.sh stop "$DIR" 2>/dev/null || true
    rm -rf "$DIR"
    # Room in the shared-memory limiter for all 200 000 keys (about 120 MB), in both modes.
    preload="keypal.rate_limit_slots = 524288"
    [ "$mode" = preload ] && preload="$preload
shared_preload_libraries = 'keypal'
keypal.database = 'keypal_bench'"
    # (cluster.sh turns fsync off for test clusters; a later line wins.)
    bash scripts/cluster.sh start "$DIR" "$PORT" "shared_buffers = '256MB'" "$preload" \
        "fsync = on" "synchronous_commit = on"
    psql -X -q -d postgres -c "CREATE DATABASE keypal_bench"
    psql -X -q -v ON_ERROR_STOP=1 -d keypal_bench -f bench/setup.sql >/dev/null 2>&1
    echo "== $mode"
    tps=()
    for round in $(seq "$ROUNDS"); do
        for s in md5 inline verify_spread verify_hot verify_from quota_spread quota_hot; do
            run "$s" "$s"
        done
        # The same verifies with a (never reached) default rate limit: every verify now counts.
        setting "SELECT keypal_configure(rate_limit => '{\"requests\": 1000000000, \"window\": \"1h\"}')"
        run rl_spread verify_spread
        run rl_hot verify_hot
        setting "SELECT keypal_configure(rate_limit => 'null')"
        setting "SELECT keypal_configure(last_used_resolution => '0s')"
        run touch_spread verify_spread
        setting "SELECT keypal_configure(last_used_resolution => '1h')"
        echo "round $round done"
    done
    declare -A med
    for s in "${!tps[@]}"; do med[$s]=$(median "${tps[$s]}"); done
    echo
    printf '%-14s %10s %8s %8s %8s   %s\n' "script" "tps" "/md5" "/inline" "/verify" "(each round)"
    for s in md5 inline verify_spread verify_hot verify_from rl_spread rl_hot quota_spread quota_hot touch_spread; do
        awk -v s="$s" -v t="${med[$s]}" -v m="${med[md5]}" -v i="${med[inline]}" -v v="${med[verify_spread]}" -v r="${tps[$s]}" \
            'BEGIN { printf "%-14s %10.0f %8.2f %8.2f %8.2f  %s\n", s, t, t / m, t / i, t / v, r }'
    done
    echo "(mode=$mode, clients=$CLIENTS, ${SECONDS_EACH}s x $ROUNDS rounds each, medians;" \
         "fsync=$(psql -X -At -d keypal_bench -c 'SHOW fsync')," \
         "synchronous_commit=$(psql -X -At -d keypal_bench -c 'SHOW synchronous_commit'))"
    echo
done
echo "targets: verify >= 1.0x inline and >= 0.8x md5; rate-limited >= 0.9x verify (preload); quota >= 0.8x verify"
