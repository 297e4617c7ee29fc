#!/usr/bin/env bash
# Import bench: keypal (release) in a private cluster at PostgreSQL's default durability.
# BENCH_KEYS (100 000) TypeScript keypal records (written by docs/examples/ts_records.js,
# with its salt: keypal.typescript_salt) are imported by one keypal_import call, each into a fresh database:
#   import       keypal_import(records): checks every record, writes keys, audit rows, timers
#   create_many  the baseline: as many new keys made by keypal_create_many (1000 per call)
#   raw_insert   the same rows put straight into keypal.keys by one INSERT ... SELECT
#                (keypal's triggers run: audit, timers; no checks)
# and prints keys/s and the ratios to create_many. Then the imported keys' verify speed
# next to created keys' (pgbench -M prepared, 2 clients, 10 s each).
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
N=${BENCH_KEYS:-100000}
DIR=/tmp/keypal-bench-import
bench_cluster "$DIR" "${BENCH_PORT:-55445}" keypal_import_bench "keypal.typescript_salt = 'bench salt'"
work=$(mktemp -d)
chmod 755 "$work"
trap 'bash scripts/cluster.sh stop "$DIR"; rm -rf "$work"' EXIT
node docs/examples/ts_records.js "$N" 'bench salt' >"$work/ts.json"
echo "records: $N, $(($(stat -c %s "$work/ts.json") / 1024 / 1024)) MiB of JSON"

declare -A secs
fresh_db bench_import
secs[import]=$(timed bench_import "SELECT keypal_import(pg_read_file('$work/ts.json')::jsonb -> 'records');")
got=$(psql -X -q -At -d bench_import -c "SELECT count(*) FROM keypal.keys")
[ "$got" = "$N" ] || { echo "imported $got keys, not $N" >&2; exit 1; }
fresh_db bench_create
secs[create_many]=$(timed bench_create "DO \$\$ BEGIN FOR i IN 1..$N / 1000 LOOP
    PERFORM keypal_create_many((SELECT jsonb_agg(jsonb_build_object('owner_id', 'u' || j % 100, 'scopes', '[\"read\"]'::jsonb))
                                  FROM generate_series(1, 1000) j));
END LOOP; END \$\$;")
fresh_db bench_raw
secs[raw_insert]=$(timed bench_raw "INSERT INTO keypal.keys (id, key_hash, algorithm, owner_id, name, scopes, resources, enabled, created_at, expires_at, revoked_at, tags)
SELECT md5(r->>'id')::uuid, decode(r->>'keyHash', 'hex'), CASE WHEN length(r->>'keyHash') = 64 THEN 'sha256' ELSE 'sha512' END,
       m->>'ownerId', m->>'name', ARRAY(SELECT jsonb_array_elements_text(m->'scopes')), coalesce(m->'resources', '{}'),
       (m->>'enabled')::boolean, (m->>'createdAt')::timestamptz, (m->>'expiresAt')::timestamptz, (m->>'revokedAt')::timestamptz,
       ARRAY(SELECT jsonb_array_elements_text(coalesce(m->'tags', '[]')))
  FROM jsonb_array_elements(pg_read_file('$work/ts.json')::jsonb -> 'records') r, LATERAL (SELECT r->'metadata' AS m) x;")

printf '%-12s %10s %10s %8s\n' what seconds keys/s ratio
for s in import create_many raw_insert; do
    awk -v s="$s" -v t="${secs[$s]}" -v n="$N" -v base="${secs[create_many]}" \
        'BEGIN { printf "%-12s %10s %10.0f %7.2fx\n", s, t, n / t, base / t }'
done

# Verify: an imported (TypeScript) key next to a created one.
read -r ts_key < <(node -e "const d = require('$work/ts.json'); const r = d.records.find(r => r.metadata.enabled && !r.metadata.revokedAt && !r.metadata.expiresAt && r.metadata.scopes.includes('read')); console.log(d.keys[r.id])")
made=$(psql -X -q -At -d bench_import -c "SELECT key FROM keypal_create(owner_id => 'bench', scopes => '{read}')")
echo "SELECT keypal_verify('$ts_key', 'read');" >"$work/ts.sql"
echo "SELECT keypal_verify('$made', 'read');" >"$work/made.sql"
[ "$(psql -X -q -At -d bench_import -f "$work/ts.sql")" != "" ] || exit 1
psql -X -q -At -d bench_import -c "SELECT (keypal_verify('$ts_key', 'read')).valid" | grep -qx t || { echo "the imported key does not verify" >&2; exit 1; }
for s in made ts; do
    tps=$(pgbench -n -M prepared -c 2 -j 2 -T "${BENCH_SECONDS:-10}" -f "$work/$s.sql" bench_import 2>&1 | sed -n 's/^tps = \([0-9.]*\).*/\1/p')
    printf 'verify %-8s %12.0f tps\n' "$s" "$tps"
done
