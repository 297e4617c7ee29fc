#!/usr/bin/env bash
# 10 million keys (issue 13; a bench, not a test: about 15 minutes and 15 GB of disk).
# keypal (release) in a private cluster at PostgreSQL's defaults (durability, shared_buffers).
#   load       SCALE_KEYS (10 000 000) keys made by keypal_create_many, CHUNK (100 000) per call,
#              owners o0..o99999 (SCALE_KEYS / 100 000 keys each); keys/s over the whole load
#   vacuum     VACUUM (ANALYZE) of keypal.keys, keypal.audit_log and keypal.events after it
#              (then a CHECKPOINT, so that the load's does not run during the measurements)
#   sizes      table + index bytes per key: keys, audit_log, events
#   verify     pgbench -M prepared, 2 clients, BENCH_SECONDS (15) s after 5 s of warm-up:
#              keypal_verify of a key drawn from a sample of 100 000 (1 % of each chunk) — the
#              same against a database of 100 000 keys (the sample there: all of them); ratio
#              10M / 100k
#   list       keypal_list(owner_id) of a random owner, 1 client: p50 / p99 latency
#   audit      keypal_audit(key_id) of a random sampled key, 1 client: p50 / p99 latency
#   sized      verify again, after a restart with shared_buffers at a quarter of the memory
#              (SCALE_SHARED_BUFFERS, in MB) and huge_pages = try, keys and their key_hash
#              index prewarmed: a server sized for its data (huge pages are used only if the
#              OS has them reserved: vm.nr_hugepages; the line says whether they were;
#              SCALE_HUGEPAGES=1, as root, reserves them for this step and gives them back);
#              list and audit latency again
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
N=${SCALE_KEYS:-10000000}
CHUNK=${CHUNK:-100000}
SECS=${BENCH_SECONDS:-15}
OWNERS=100000
DIR=/tmp/keypal-bench-scale
if [ "${SCALE_HUGEPAGES:-0}" = 1 ] && ! [ -w /proc/sys/vm/nr_hugepages ]; then
    echo "SCALE_HUGEPAGES=1 needs root and a writable /proc/sys/vm/nr_hugepages" >&2
    exit 2
fi
bench_cluster "$DIR" "${BENCH_PORT:-55449}" keypal_scale_small "max_wal_size = 4GB"
work=$(mktemp -d)
chmod 755 "$work"
trap 'bash scripts/cluster.sh stop "$DIR"; rm -rf "$work"' EXIT
psql -X -q -d postgres -c "CREATE DATABASE keypal_scale_big"

q() { psql -X -q -At -v ON_ERROR_STOP=1 -d "$@"; }
now() { date +%s.%N; }
for db in keypal_scale_small keypal_scale_big; do
    q "$db" -c "CREATE EXTENSION keypal" -c "CREATE TABLE sample (n serial PRIMARY KEY, key text, id uuid)"
done
# one chunk: CHUNK new keys; keep `keep` (a fraction) of them, with their plaintext, in sample
chunk() {
    q "$1" -c "INSERT INTO sample (key, id)
               SELECT c.key, c.id FROM keypal_create_many((
                   SELECT jsonb_agg(jsonb_build_object('owner_id', 'o' || ((i + $2) % $OWNERS), 'scopes', '[\"read\"]'::jsonb))
                     FROM generate_series(1, $CHUNK) i)) c
                WHERE random() < $3"
}
chunk keypal_scale_small 0 1
t0=$(now)
for ((done = 0; done < N; done += CHUNK)); do
    chunk keypal_scale_big "$done" "$(awk -v c="$CHUNK" 'BEGIN { print 1000 / c }')"
    if (( (done / CHUNK) % 10 == 9 )); then echo "  loaded $((done + CHUNK)) keys, $(awk -v t0="$t0" -v t="$(now)" 'BEGIN { printf "%.0f", t - t0 }') s"; fi
done
load=$(awk -v t0="$t0" -v t="$(now)" 'BEGIN { printf "%.1f", t - t0 }')
keys=$(q keypal_scale_big -c "SELECT count(*) FROM keypal.keys")
t0=$(now)
q keypal_scale_big -c "VACUUM (ANALYZE) keypal.keys" -c "VACUUM (ANALYZE) keypal.audit_log" -c "VACUUM (ANALYZE) keypal.events"
vacuum=$(awk -v t0="$t0" -v t="$(now)" 'BEGIN { printf "%.1f", t - t0 }')
q keypal_scale_small -c "VACUUM (ANALYZE)"
# (the load's last checkpoint done, not spread over the measurements)
q postgres -c "CHECKPOINT"
echo "load: $keys keys in $load s ($(awk -v n="$keys" -v t="$load" 'BEGIN { printf "%.0f", n / t }') keys/s); VACUUM (ANALYZE) of keys, audit_log, events: $vacuum s"
q keypal_scale_big -c "SELECT format('%-10s table %6s MB  indexes %6s MB  %4s bytes per key', r,
        pg_table_size(('keypal.' || r)::regclass) / 1048576, pg_indexes_size(('keypal.' || r)::regclass) / 1048576,
        (pg_table_size(('keypal.' || r)::regclass) + pg_indexes_size(('keypal.' || r)::regclass)) / $keys)
   FROM unnest(ARRAY['keys', 'audit_log', 'events']) r"

cat >"$work/verify.sql" <<'SQL'
\set n random(1, :samples)
SELECT v.valid FROM sample s, keypal_verify(s.key, 'read') v WHERE s.n = :n;
SQL
cat >"$work/list.sql" <<SQL
\set o random(0, $((OWNERS - 1)))
SELECT count(*) FROM keypal_list(owner_id => 'o' || :o);
SQL
cat >"$work/audit.sql" <<'SQL'
\set n random(1, :samples)
SELECT count(*) FROM sample s, keypal_audit(key_id => s.id) a WHERE s.n = :n;
SQL
tps() {
    local db=$1 script=$2 samples
    samples=$(q "$db" -c "SELECT max(n) FROM sample")
    pgbench -n -M prepared -c 2 -j 2 -T 5 -D samples="$samples" -f "$script" "$db" >/dev/null 2>&1
    pgbench -n -M prepared -c 2 -j 2 -T "$SECS" -D samples="$samples" -f "$script" "$db" 2>&1 | sed -n 's/^tps = \([0-9.]*\).*/\1/p'
}
# p50 and p99 of one client's transactions, from pgbench's per-transaction log (microseconds)
latency() {
    local db=$1 script=$2 samples
    samples=$(q "$db" -c "SELECT max(n) FROM sample")
    rm -f "$work"/pgbench_log.*
    (cd "$work" && pgbench -n -M prepared -c 1 -T "$SECS" -D samples="$samples" -l -f "$script" "$db" >/dev/null 2>&1)
    cat "$work"/pgbench_log.* | awk '{ print $3 }' | sort -n | awk '{ v[NR] = $1 } END { printf "p50 %.2f ms  p99 %.2f ms  (%d calls)", v[int(NR * 0.5)] / 1000, v[int(NR * 0.99)] / 1000, NR }'
}
# measure SERVER: verify in both databases and their ratio, then list and audit latency
measure() {
    local small big
    small=$(tps keypal_scale_small "$work/verify.sql")
    big=$(tps keypal_scale_big "$work/verify.sql")
    awk -v s="$small" -v b="$big" -v n="$keys" -v m="$1" 'BEGIN { printf "verify (spread over 100 000 keys), %s: %.0f tps at 100 000 keys, %.0f tps at %d keys: %.2fx\n", m, s, b, n, b / s }'
    echo "  keypal_list(owner_id), $((keys / OWNERS)) keys per owner: $(latency keypal_scale_big "$work/list.sql")"
    echo "  keypal_audit(key_id): $(latency keypal_scale_big "$work/audit.sql")"
}
measure "shared_buffers 128MB"

# A server sized for its data: a quarter of the memory for shared_buffers, as is usual (or
# of the cgroup's limit, when there is one).
limit=$(cat /sys/fs/cgroup/memory.max 2>/dev/null || echo max)
sized=${SCALE_SHARED_BUFFERS:-$(awk -v l="$limit" '/^MemTotal/ { m = $2 * 1024; if (l != "max" && l < m) m = l; printf "%d", m / 1048576 / 4 }' /proc/meminfo)}
q postgres -c "ALTER SYSTEM SET shared_buffers = '${sized}MB'" -c "ALTER SYSTEM SET huge_pages = 'try'"
bash scripts/cluster.sh stop "$DIR"
if [ "${SCALE_HUGEPAGES:-0}" = 1 ]; then
    # as many pages (of the kernel's size) as the server asks for, if memory has them
    hugepages_were=$(cat /proc/sys/vm/nr_hugepages)
    trap 'bash scripts/cluster.sh stop "$DIR" || true; echo "$hugepages_were" >/proc/sys/vm/nr_hugepages || true; rm -rf "$work"' EXIT
    want=$(runuser -u postgres -- /usr/lib/postgresql/15/bin/postgres -D "$DIR" -C shared_memory_size_in_huge_pages)
    have=$(awk '/^MemAvailable/ { a = $2 } /^Hugepagesize/ { h = $2 } END { printf "%d", a / h * 0.9 }' /proc/meminfo)
    echo $((want < have ? want : have)) >/proc/sys/vm/nr_hugepages
fi
bash scripts/cluster.sh start "$DIR" "${BENCH_PORT:-55449}"
# (whether the server's shared memory is in huge pages: its own mapping says)
if grep -q anon_hugepage "/proc/$(head -1 "$DIR/postmaster.pid")/maps" 2>/dev/null; then huge=on; else huge=off; fi
for db in keypal_scale_small keypal_scale_big; do
    q "$db" -c "CREATE EXTENSION IF NOT EXISTS pg_prewarm" \
        -c "SELECT pg_prewarm('keypal.keys'), pg_prewarm('keypal.keys_key_hash_key'), pg_prewarm('sample'), pg_prewarm('sample_pkey')" >/dev/null
done
measure "shared_buffers ${sized}MB, prewarmed, huge pages $huge"
