#!/usr/bin/env bash
# Request-signing bench: keypal (release) in a private cluster at PostgreSQL's default
# durability; pgbench -M prepared, BENCH_CLIENTS (2) clients, BENCH_SECONDS (10) s each, one
# run of each, one after the other:
#   verify     SELECT keypal_verify(key, 'read') on one key (the baseline)
#   sign       SELECT keypal_sign(secret, 'POST', path, body) (what a client computes)
#   sign_verify SELECT keypal_verify_signature(id, 'POST', path, body, keypal_sign(...)): a
#              fresh signature each call (a repeated one is a replay), so it includes a sign
# and prints tps and the ratios to verify.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
CLIENTS=${BENCH_CLIENTS:-2}
SECONDS_EACH=${BENCH_SECONDS:-10}
DIR=/tmp/keypal-bench-signing
bench_cluster "$DIR" "${BENCH_PORT:-55444}" keypal_sign_bench "keypal.signing_secret = 'bench server secret'"
work=$(mktemp -d)
trap 'bash scripts/cluster.sh stop "$DIR"; rm -rf "$work"' EXIT
psql -X -q -c "CREATE EXTENSION keypal"
read -r key id secret < <(psql -X -q -At -F ' ' -c "SELECT key, id, signing_secret FROM keypal_create(owner_id => 'bench', scopes => '{read}', signing => true)")
echo "SELECT keypal_verify('$key', 'read');" > "$work/verify.sql"
echo "SELECT keypal_sign('$secret', 'POST', '/v1/orders/' || (random() * 1e9)::bigint, '{\"qty\": 2}');" > "$work/sign.sql"
# A false answer fails the statement: only accepted signatures count.
cat > "$work/sign_verify.sql" <<SQL
\\set n random(1, 1000000000000)
SELECT CASE WHEN keypal_verify_signature('$id', 'POST', '/v1/orders/' || :n, '{"qty": 2}',
                                         keypal_sign('$secret', 'POST', '/v1/orders/' || :n, '{"qty": 2}'))
            THEN 1 ELSE 1 / (random() * 0)::int END;
SQL
# Signatures dated within seconds of the replay memory's start are refused: wait that out.
psql -X -q -c "DO \$\$ BEGIN FOR i IN 1..60 LOOP
    EXIT WHEN keypal_verify_signature('$id', 'GET', '/warm-up/' || i, '', keypal_sign('$secret', 'GET', '/warm-up/' || i, '', clock_timestamp()));
    PERFORM pg_sleep(0.25); END LOOP; END \$\$"
declare -A tps
for s in verify sign sign_verify; do
    tps[$s]=$(pgbench -n -M prepared -c "$CLIENTS" -j "$CLIENTS" -T "$SECONDS_EACH" -f "$work/$s.sql" 2>&1 |
              sed -n 's/^tps = \([0-9.]*\).*/\1/p')
done
accepted=$(psql -X -q -At -c "SELECT keypal_verify_signature('$id', 'GET', '/check', '', keypal_sign('$secret', 'GET', '/check', ''))")
for s in verify sign sign_verify; do
    awk -v s="$s" -v t="${tps[$s]}" -v v="${tps[verify]}" 'BEGIN { printf "%-12s %10.0f tps  %5.2fx verify\n", s, t, t / v }'
done
echo "(a fresh signature verifies: $accepted)"
