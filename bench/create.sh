#!/usr/bin/env bash
# Management-plane bench (issue 13): keypal (release) in a private cluster at PostgreSQL's
# default durability, one session, each in one transaction, BENCH_KEYS (100 000) keys:
#   plain_insert  the baseline: INSERT ... SELECT of as many rows into a table with keypal.keys'
#                 columns and indexes, no triggers, with a sha256 of a random key
#   create        SELECT keypal_create(...) FROM generate_series(...): one statement
#   create_many   one keypal_create_many call with every spec
#   import        keypal_import of keypal_export (the created keys) into a fresh database,
#                 reading the records and making its argument included
#   import_call   the same call with its argument made beforehand: keypal_import's own time
# prints seconds, keys/s and the ratio to plain_insert; then keypal_create's server time per
# call (SINGLE = 10 000 calls in one DO block), the peak private memory of one
# keypal_create_many of BENCH_KEYS specs, and the bulk lifecycle:
#   revoke_all    keypal_revoke_all of an owner with LIFECYCLE_KEYS (100 000) keys: roots,
#                 each with a chain of 3 levels of children (a quarter of the keys each)
#   revoke_org    keypal_revoke_by_owner_and_org of as many keys, so chained, of an owner in
#                 an org
#   rotate        keypal_rotate of ROTATE_KEYS (10 000) keys in one statement
#   revoke_each   keypal_revoke of ROTATE_KEYS keys, one call per key, in one statement
#   disable_all   keypal_disable_all of an owner with LIFECYCLE_KEYS keys
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
N=${BENCH_KEYS:-100000}
SINGLE=${SINGLE:-10000}
LIFE=${LIFECYCLE_KEYS:-100000}
ROT=${ROTATE_KEYS:-10000}
DIR=/tmp/keypal-bench-create
bench_cluster "$DIR" "${BENCH_PORT:-55448}" keypal_create_bench
trap 'bash scripts/cluster.sh stop "$DIR"' EXIT

count() { psql -X -q -At -d "$1" -c "$2"; }
expect() { [ "$2" = "$3" ] || { echo "$1: got $2, expected $3" >&2; exit 1; }; }

declare -A secs
fresh_db bench_plain pgcrypto
psql -X -q -d bench_plain -c "CREATE TABLE plain (LIKE keypal.keys INCLUDING DEFAULTS INCLUDING INDEXES)"
secs[plain_insert]=$(timed bench_plain "INSERT INTO plain (id, key_hash, algorithm, owner_id, scopes, resources, tags, metadata, enabled)
SELECT gen_random_uuid(), digest('sk_' || md5(random()::text), 'sha256'), 'sha256', 'c' || i % 1000, '{read}', '{}', '{}', '{}', true
  FROM generate_series(1, $N) i;")
fresh_db bench_create pgcrypto
secs[create]=$(timed bench_create "SELECT count(*) FROM (SELECT keypal_create(owner_id => 'c' || i % 1000, scopes => '{read}') FROM generate_series(1, $N) i) x;")
expect create "$(count bench_create "SELECT count(*) FROM keypal.keys")" "$N"
expect "create audit" "$(count bench_create "SELECT count(*) FROM keypal.audit_log WHERE action = 'created'")" "$N"
secs[create_many]=$(timed bench_create "SELECT count(*) FROM keypal_create_many((SELECT jsonb_agg(jsonb_build_object('owner_id', 'm' || i % 1000, 'scopes', '[\"read\"]'::jsonb)) FROM generate_series(1, $N) i));")
expect create_many "$(count bench_create "SELECT count(*) FROM keypal.keys WHERE owner_id LIKE 'm%'")" "$N"
fresh_db bench_import pgcrypto
psql -X -q -At -d bench_create -c "COPY (SELECT r::text FROM keypal_export_records() AS r WHERE r->>'owner_id' LIKE 'c%') TO STDOUT" >/tmp/keypal-bench-records.jsonl
secs[import]=$(timed bench_import "CREATE TEMP TABLE recs (r jsonb);
\\copy recs FROM '/tmp/keypal-bench-records.jsonl'
SELECT keypal_import((SELECT jsonb_agg(r) FROM recs));")
expect import "$(count bench_import "SELECT count(*) FROM keypal.keys")" "$N"
# The same import with its argument made first (not timed): keypal_import's own time.
fresh_db bench_import pgcrypto
psql -X -q -d bench_import -c "CREATE TABLE recs (r jsonb)" -c "\\copy recs FROM '/tmp/keypal-bench-records.jsonl'" \
     -c "CREATE TABLE arg AS SELECT jsonb_agg(r) AS data FROM recs" -c "CHECKPOINT"
secs[import_call]=$(timed bench_import "SELECT keypal_import((SELECT data FROM arg));")
expect import_call "$(count bench_import "SELECT count(*) FROM keypal.keys")" "$N"
rm -f /tmp/keypal-bench-records.jsonl

printf '%-13s %9s %10s %16s\n' what seconds keys/s 'vs plain insert'
for s in plain_insert create create_many import import_call; do
    awk -v s="$s" -v t="${secs[$s]}" -v n="$N" -v base="${secs[plain_insert]}" \
        'BEGIN { printf "%-13s %9s %10.0f %15.2fx\n", s, t, n / t, base / t }'
done
one=$(timed bench_create "DO \$\$ BEGIN FOR i IN 1..$SINGLE LOOP PERFORM keypal_create(owner_id => 's' || i, scopes => '{read}'); END LOOP; END \$\$;")
awk -v t="$one" -v n="$SINGLE" 'BEGIN { printf "keypal_create server time: %.3f ms per call (%d calls in one DO block)\n", t * 1000 / n, n }'

# Memory: the peak private memory (RssAnon, sampled every 0.2 s) of the backend running one
# keypal_create_many of N specs (the argument made in the same statement, as above).
mem=$(mktemp -d)
psql -X -q -v ON_ERROR_STOP=1 -d bench_create >/dev/null 2>"$mem/err" <<SQL &
SET statement_timeout = 0;
\pset tuples_only on
\o $mem/pid
SELECT pg_backend_pid();
\o
SELECT pg_sleep(0.5);
SELECT count(*) FROM keypal_create_many((SELECT jsonb_agg(jsonb_build_object('owner_id', 'r' || i % 1000, 'scopes', '["read"]'::jsonb)) FROM generate_series(1, $N) i));
SQL
client=$!
peak=0
for _ in $(seq 100); do [ -s "$mem/pid" ] && break; sleep 0.1; done
pid=$(tr -dc 0-9 <"$mem/pid" 2>/dev/null || true)
[ -n "$pid" ] || { echo "memory: no backend pid from psql: $(cat "$mem/err")" >&2; exit 1; }
while kill -0 "$client" 2>/dev/null; do
    r=$(awk '/^RssAnon/ { print $2 }' "/proc/$pid/status" 2>/dev/null || true)
    if [ -n "$r" ] && [ "$r" -gt "$peak" ]; then peak=$r; fi
    sleep 0.2
done
wait "$client" || { echo "memory: keypal_create_many failed: $(cat "$mem/err")" >&2; exit 1; }
rm -rf "$mem"
expect memory "$(count bench_create "SELECT count(*) FROM keypal.keys WHERE owner_id LIKE 'r%'")" "$N"
awk -v p="$peak" -v n="$N" 'BEGIN { printf "keypal_create_many of %d specs: peak private memory of its backend %.0f MB (%.1f KB per key)\n", n, p / 1024, p / n }'

# Bulk lifecycle: an owner's keys in chains root -> child -> grandchild -> great-grandchild.
fresh_db bench_life pgcrypto
roots=$((LIFE / 4))
psql -X -q -v ON_ERROR_STOP=1 -d bench_life <<SQL
SELECT count(*) FROM keypal_create_many((SELECT jsonb_agg(jsonb_build_object('owner_id', 'life', 'scopes', '["read"]'::jsonb)) FROM generate_series(1, $roots)));
SELECT count(*) FROM keypal_create_many((SELECT jsonb_agg(jsonb_build_object('owner_id', 'lifeorg', 'org_id', 'acme', 'scopes', '["read"]'::jsonb)) FROM generate_series(1, $roots)));
DO \$\$
DECLARE lvl int;
BEGIN
    FOR lvl IN 1..3 LOOP
        PERFORM count(*) FROM keypal_create_many((
            SELECT jsonb_agg(jsonb_strip_nulls(jsonb_build_object('owner_id', k.owner_id, 'org_id', k.org_id, 'scopes', '["read"]'::jsonb, 'parent_id', k.id)))
              FROM keypal.keys k
             WHERE k.owner_id IN ('life', 'lifeorg') AND NOT EXISTS (SELECT 1 FROM keypal.keys c WHERE c.parent_id = k.id)));
    END LOOP;
END \$\$;
SELECT count(*) FROM keypal_create_many((SELECT jsonb_agg(jsonb_build_object('owner_id', 'dis', 'scopes', '["read"]'::jsonb)) FROM generate_series(1, $LIFE)));
SELECT count(*) FROM keypal_create_many((SELECT jsonb_agg(jsonb_build_object('owner_id', 'rot', 'scopes', '["read"]'::jsonb)) FROM generate_series(1, $ROT)));
SELECT count(*) FROM keypal_create_many((SELECT jsonb_agg(jsonb_build_object('owner_id', 'each', 'scopes', '["read"]'::jsonb)) FROM generate_series(1, $ROT)));
SQL
expect "lifecycle keys" "$(count bench_life "SELECT count(*) FROM keypal.keys WHERE owner_id = 'life'")" "$((roots * 4))"
secs[revoke_all]=$(timed bench_life "SELECT keypal_revoke_all('life');")
expect "revoked" "$(count bench_life "SELECT count(*) FROM keypal.keys WHERE owner_id = 'life' AND revoked_at IS NOT NULL")" "$((roots * 4))"
expect "revoke audit" "$(count bench_life "SELECT count(*) FROM keypal.audit_log WHERE action = 'revoked'")" "$((roots * 4))"
expect "org keys" "$(count bench_life "SELECT count(*) FROM keypal.keys WHERE owner_id = 'lifeorg' AND org_id = 'acme'")" "$((roots * 4))"
secs[revoke_org]=$(timed bench_life "SELECT keypal_revoke_by_owner_and_org('lifeorg', 'acme');")
expect "revoked in the org" "$(count bench_life "SELECT count(*) FROM keypal.keys WHERE owner_id = 'lifeorg' AND revoked_at IS NOT NULL")" "$((roots * 4))"
secs[rotate]=$(timed bench_life "SELECT count(*) FROM (SELECT keypal_rotate(k.id) FROM keypal.keys k WHERE k.owner_id = 'rot') x;")
expect "rotated" "$(count bench_life "SELECT count(*) FROM keypal.keys WHERE owner_id = 'rot' AND rotated_to IS NOT NULL")" "$ROT"
secs[revoke_each]=$(timed bench_life "SELECT count(*) FROM (SELECT keypal_revoke(k.id) FROM keypal.keys k WHERE k.owner_id = 'each') x;")
expect "revoked one by one" "$(count bench_life "SELECT count(*) FROM keypal.keys WHERE owner_id = 'each' AND revoked_at IS NOT NULL")" "$ROT"
secs[disable_all]=$(timed bench_life "SELECT keypal_disable_all('dis');")
expect "disabled" "$(count bench_life "SELECT count(*) FROM keypal.keys WHERE owner_id = 'dis' AND NOT enabled")" "$LIFE"
printf '%-13s %9s %10s %s\n' lifecycle seconds keys/s keys
for s in revoke_all:$((roots * 4)) revoke_org:$((roots * 4)) rotate:$ROT revoke_each:$ROT disable_all:$LIFE; do
    awk -v s="${s%%:*}" -v t="${secs[${s%%:*}]}" -v n="${s##*:}" 'BEGIN { printf "%-13s %9s %10.0f %d\n", s, t, n / t, n }'
done
