#!/usr/bin/env bash
# Replicas bench (issue 14): a primary (PostgreSQL's default durability) and one streaming
# standby on this machine.
#   revocation delay  REVOKES (200) keys revoked on the primary one by one, REVOKE_GAP_MS (20)
#                     apart, each committed alone; a session on the standby verifies every
#                     pending key in turn (about a millisecond a round) and notes when each
#                     first answers REVOKED. Delay = that moment - the moment the revoke's
#                     COMMIT returned on the primary (same machine, same clock): median, p99, max.
#   over-admission    one key limited to LIMIT (100) an hour, verified LIMIT times through
#                     each server at once: admitted in all, with global limits (the standby
#                     ships its counts to the primary) and with limit_split => 2.
#   verify tps        pgbench -M prepared, 2 clients, BENCH_SECONDS (10) each: one key's
#                     keypal_verify on the standby and on the primary, and the ratio; a key
#                     without limits, then one with a rate limit.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
N=${REVOKES:-200}
GAP=${REVOKE_GAP_MS:-20}
DIR=/tmp/keypal-bench-replicas
SDIR=$DIR-standby
PORT=${BENCH_PORT:-55450}
SPORT=$((PORT + 1))
bench_cluster "$DIR" "$PORT" keypal_replicas_bench
stop_all() {
    bash scripts/cluster.sh stop "$SDIR" 2>/dev/null || true
    rm -rf "$SDIR"
    bash scripts/cluster.sh stop "$DIR"
}
trap stop_all EXIT
work=$(mktemp -d)
chmod 777 "$work"
psql -X -q -c "CREATE EXTENSION keypal"
psql -X -q -At -c "SELECT id, key FROM keypal_create_many((SELECT jsonb_agg(jsonb_build_object('owner_id', 'r' || i))
                                                              FROM generate_series(1, $N) i))" -F ' ' >"$work/keys"
vkey=$(psql -X -q -At -c "SELECT key FROM keypal_create(owner_id => 'bench', scopes => '{read}')")
# hot_standby_feedback: the watcher below is one long transaction; without it, the primary's
# cleanup of old row versions conflicts with it and replay waits for it (up to
# max_standby_streaming_delay, 30 s) before cancelling it.
bash scripts/cluster.sh standby "$SDIR" "$SPORT" "$DIR" "$PORT" "hot_standby_feedback = on"
sq() { psql -X -q -At -h "$SDIR" -p "$SPORT" "$@"; }
replayed() {  # waits until the standby replayed the primary's WAL so far
    local lsn
    lsn=$(psql -X -q -At -c "SELECT pg_current_wal_lsn()")
    until [ "$(sq -c "SELECT pg_last_wal_replay_lsn() >= '$lsn'")" = t ]; do sleep 0.1; done
}
replayed

# The watcher: every pending key verified in turn until each answers REVOKED (or 120 s).
keys_array="ARRAY[$(awk '{printf "%s'\''%s'\''", (NR > 1 ? "," : ""), $2}' "$work/keys")]"
sq -v ON_ERROR_STOP=1 >"$work/seen" 2>&1 <<SQL &
DO \$\$
DECLARE
    keys text[] := $keys_array;
    pending boolean[] := array_fill(true, ARRAY[cardinality($keys_array)]);
    left_n int := cardinality($keys_array);
    t0 timestamptz := clock_timestamp();
BEGIN
    WHILE left_n > 0 AND clock_timestamp() < t0 + interval '120 seconds' LOOP
        FOR i IN 1 .. cardinality(keys) LOOP
            IF pending[i] AND (keypal_verify(keys[i])).error_code = 'REVOKED' THEN
                pending[i] := false;
                left_n := left_n - 1;
                RAISE NOTICE 'seen % %', i, extract(epoch FROM clock_timestamp());
            END IF;
        END LOOP;
    END LOOP;
END \$\$;
SQL
watcher=$!
sleep 1
# The revokes, one commit each; the moment each COMMIT returned.
awk -v gap="$GAP" '{printf "SELECT keypal_revoke('\''%s'\'');\nSELECT %d, extract(epoch FROM clock_timestamp());\nSELECT pg_sleep(%f);\n", $1, NR, gap / 1000}' "$work/keys" |
    psql -X -q -At -F ' ' | grep -E '^[0-9]+ [0-9.]+$' >"$work/committed"
wait "$watcher"
sed -n 's/.*NOTICE:  seen \([0-9]*\) \([0-9.]*\)$/\1 \2/p' "$work/seen" >"$work/seen.txt"
seen=$(wc -l <"$work/seen.txt")
echo "revokes: $N, $GAP ms apart; seen REVOKED on the standby: $seen"
join <(sort -k1,1 "$work/committed") <(sort -k1,1 "$work/seen.txt") |
    awk '{printf "%.3f\n", ($3 - $2) * 1000}' | sort -n >"$work/delays"
awk '{d[NR] = $1} END {
    printf "revocation delay, commit on the primary to REVOKED on the standby (ms): median %.2f  p99 %.2f  max %.2f  min %.2f\n",
        d[int((NR + 1) / 2)], d[int(NR * 0.99 + 0.999)], d[NR], d[1] }' "$work/delays"

# Over-admission: one key limited to LIMIT (100) an hour, verified LIMIT times through each
# of the two servers at once, without and with limit_split => 2.
L=${LIMIT:-100}
admitted() {  # admitted KEY: valid answers of L verifies on each server, at once: "primary standby"
    for s in p s; do
        for _ in $(seq "$L"); do echo "SELECT (keypal_verify('$1')).valid;"; done |
            if [ $s = p ]; then psql -X -q -At; else sq; fi | grep -c '^t$' >"$work/adm.$s" &
    done
    wait
    echo "$(cat "$work/adm.p") $(cat "$work/adm.s")"
}
over() {  # over SPLIT: creates a key, waits for the standby, prints what each server admitted
    psql -X -q -At -c "SELECT keypal_configure(limit_split => $1)" >/dev/null
    local k
    k=$(psql -X -q -At -c "SELECT key FROM keypal_create(owner_id => 'over', rate_limit => '{\"requests\": $L, \"window\": \"1h\"}')")
    replayed
    admitted "$k"
}
read -r p1 s1 < <(over 1)
read -r p2 s2 < <(over 2)
echo "a key limited to $L an hour, verified $L times through each server at once: global limits $p1 + $s1 = $((p1 + s1)) admitted ($(awk -v a=$((p1 + s1)) -v l="$L" 'BEGIN { printf "%.2f", a / l }')x the limit; the bound: what the servers admitted within two flush intervals of $(psql -X -q -At -c "LOAD 'keypal'" -c "SHOW keypal.flush_interval") each, here all of it); with limit_split => 2, $p2 + $s2 = $((p2 + s2))"
psql -X -q -At -c "SELECT keypal_configure(limit_split => 1)" >/dev/null

# Verify tps on each server: a key without limits, then one with a rate limit (on the
# standby, its admissions are shipped to the primary every flush interval meanwhile).
rkey=$(psql -X -q -At -c "SELECT key FROM keypal_create(owner_id => 'bench', scopes => '{read}', rate_limit => '{\"requests\": 1000000000000, \"window\": \"1h\"}')")
replayed
tps() {  # tps KEY [pgbench connection options]
    local f=$work/verify-$1.sql
    echo "SELECT keypal_verify('$1', 'read');" >"$f"
    chmod 644 "$f"
    shift
    pgbench -n -M prepared -c 2 -j 2 -T "${BENCH_SECONDS:-10}" -f "$f" "$@" 2>&1 | sed -n 's/^tps = \([0-9.]*\).*/\1/p'
}
for k in "$vkey:no limits" "$rkey:a rate limit"; do
    standby=$(tps "${k%%:*}" -h "$SDIR" -p "$SPORT" keypal_replicas_bench)
    primary=$(tps "${k%%:*}" keypal_replicas_bench)
    awk -v s="$standby" -v p="$primary" -v w="${k#*:}" 'BEGIN { printf "verify tps, one key with %s: standby %.0f, primary %.0f, standby/primary %.2fx\n", w, s, p, s / p }'
done
rm -rf "$work"
