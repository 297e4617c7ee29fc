#!/usr/bin/env bash
# Verify writes nothing: no WAL, no transaction id, no row lock — for plain, rate-limited
# and quota'd keys, first touch (last_used_at stale) included. What it records reaches the
# tables through the flush worker.
source "$(dirname "$0")/lib.sh"
restore() {
    q -c "ALTER SYSTEM RESET keypal.flush_interval" -c "SELECT pg_reload_conf()" >/dev/null 2>&1 || true
    q -c "DROP TABLE IF EXISTS wal_keys" >/dev/null 2>&1 || true
}
trap restore EXIT

# 3 rounds x 1000 fresh keys: plain, rate-limited and quota'd mixed.
q >/dev/null <<'SQL'
CREATE TABLE wal_keys AS
SELECT i % 3 AS round, c.id, c.key
  FROM generate_series(0, 2999) i,
       LATERAL keypal_create(owner_id => 'wal',
           rate_limit => CASE WHEN i % 3 = 1 THEN '{"requests": 100, "window": "1h"}'::jsonb END,
           quota => CASE WHEN i % 3 = 2 THEN '{"limit": 100, "period": "day"}'::jsonb END) c;
SQL
# Hold the flush worker's writes off for the measurement (it writes behind, not verify).
q -c "ALTER SYSTEM SET keypal.flush_interval = '60s'" -c "SELECT pg_reload_conf()" >/dev/null
sleep 0.5
q -c "VACUUM keypal.keys" -c "VACUUM keypal.quota_usage" -c "VACUUM wal_keys" -c "CHECKPOINT" >/dev/null

# A background WAL record (a checkpoint, the bgwriter's snapshot of running transactions)
# can land during a round; verify's writes would land in every round. One clean round of
# 1000 verifies is proof.
clean=0
for round in 0 1 2; do
    out=$(q -c "SELECT pg_current_wal_insert_lsn()" \
            -c "SELECT count(*) FILTER (WHERE (keypal_verify(key)).valid) FROM wal_keys WHERE round = $round" \
            -c "SELECT pg_current_wal_insert_lsn()" | tr '\n' ' ')
    read -r lsn1 n lsn2 <<<"$out"
    echo "# round $round: $n valid, WAL $lsn1 -> $lsn2"
    [ "$n" = 1000 ] && [ "$lsn1" = "$lsn2" ] && clean=$((clean + 1))
done
ok "$( [ "$clean" -ge 1 ]; echo $? )" "1000 verifies of fresh keys write no WAL ($clean of 3 rounds with the WAL position unchanged)"
is "$(q -c "SELECT count(*) FROM keypal.key_usage u JOIN wal_keys w ON w.id = u.key_id")" 0 \
   "nothing written by verify"
is "$(q -c "SELECT count(*) FROM keypal.key_info k JOIN wal_keys w USING (id) WHERE k.last_used_at IS NOT NULL")" 3000 \
   "but every use is recorded (key_info reads shared memory too)"

# No transaction id, no lock: a verifier's transaction left open holds nothing.
read -r id key < <(q -F ' ' -c "SELECT id, key FROM keypal_create(owner_id => 'wal', rate_limit => '{\"requests\": 100, \"window\": \"1h\"}', quota => '{\"limit\": 100}')")
read -r id2 key2 < <(q -F ' ' -c "SELECT id, key FROM keypal_create(owner_id => 'wal')")
coproc VERIFIER { psql -X -q -At -v ON_ERROR_STOP=1 2>&1; }
verifier_pid=$VERIFIER_PID
ask() { echo "$1" >&"${VERIFIER[1]}"; read -r line <&"${VERIFIER[0]}"; echo "$line"; }
is "$(ask "BEGIN; SELECT (keypal_verify('$key')).valid AND (keypal_verify('$key2')).valid;")" t "a verifier's transaction, left open"
vpid=$(ask "SELECT pg_backend_pid();")
is "$(q -c "SELECT backend_xid IS NULL FROM pg_stat_activity WHERE pid = $vpid")" t "has no transaction id (it wrote nothing)"
is "$(q -c "SELECT count(*) FROM pg_locks WHERE pid = $vpid AND locktype IN ('tuple', 'transactionid')")" 0 "and holds no row or transaction lock"
is "$(q -c "SET lock_timeout = '1s'" -c "SELECT keypal_disable('$id') IS NOT NULL")" t "keypal_disable with lock_timeout = 1s succeeds meanwhile"
is "$(q -c "SET lock_timeout = '1s'" -c "SELECT keypal_enable('$id') IS NOT NULL")" t "keypal_enable too"
is "$(q -c "SET lock_timeout = '1s'" -c "SELECT (keypal_update('$id', name => 'renamed')).id IS NOT NULL")" t "keypal_update too"
is "$(q -c "SET lock_timeout = '1s'" -c "SELECT id IS NOT NULL FROM keypal_rotate('$id2')")" t "keypal_rotate too"
is "$(q -c "SET lock_timeout = '1s'" -c "SELECT keypal_revoke('$id') IS NOT NULL")" t "keypal_revoke too"
is "$(ask "SELECT error_code FROM keypal_verify('$key');")" REVOKED "the open transaction's next verify sees the revoke"
ask "COMMIT; SELECT 1;" >/dev/null
exec {VERIFIER[1]}>&-
wait "$verifier_pid" 2>/dev/null || true

# The worker, running again at its usual pace, writes what was recorded.
q -c "ALTER SYSTEM RESET keypal.flush_interval" -c "SELECT pg_reload_conf()" >/dev/null
is "$(wait_for "SELECT count(*) FROM keypal.key_usage u JOIN wal_keys w ON w.id = u.key_id" 3000)" 3000 \
   "the flush worker wrote all 3000 last uses"
is "$(wait_for "SELECT sum(used) FROM keypal.quota_usage q JOIN wal_keys w ON w.id = q.key_id" 1000)" 1000 \
   "and the 1000 quota counts"
is "$(wait_for "SELECT sum(hour_requests) FROM keypal.quota_usage q JOIN wal_keys w ON w.id = q.key_id" 1000)" 1000 \
   "and the 1000 requests of this hour (kept in the quota row until the hour is over)"
sleep 1  # five more flush intervals: nothing is written twice
is "$(q -c "SELECT sum(requests) FROM keypal.hourly_usage u JOIN wal_keys w ON w.id = u.key_id")" 1000 \
   "keypal.hourly_usage counts each request once"
is "$(q -c "SELECT sum(used) FROM keypal.quota_usage q JOIN wal_keys w ON w.id = q.key_id")" 1000 "and so does the quota"
# An hour that is over moves from the quota row to keypal.usage at the next flush (here:
# an hour made 3 h old), and the current hour counts on in the row.
read -r hid hkey < <(q -F ' ' -c "SELECT id, key FROM keypal_create(owner_id => 'wal', quota => '{\"limit\": 100}')")
q -c "SELECT (keypal_verify('$hkey')).valid" >/dev/null
wait_for "SELECT hour_requests FROM keypal.quota_usage WHERE key_id = '$hid'" 1 >/dev/null
q -c "UPDATE keypal.quota_usage SET hour = date_trunc('hour', now()) - interval '3 hours', hour_requests = 4 WHERE key_id = '$hid'"
total=$(q -c "SELECT sum(requests) FROM keypal.hourly_usage WHERE key_id = '$hid'")
for _ in 1 2; do q -c "SELECT (keypal_verify('$hkey')).valid" >/dev/null; done
is "$(wait_for "SELECT hour_requests FROM keypal.quota_usage WHERE key_id = '$hid' AND hour = date_trunc('hour', now())" 2)" 2 \
   "the current hour counts on in the quota row"
is "$(q -c "SELECT requests FROM keypal.usage WHERE key_id = '$hid' AND endpoint = '' AND hour = date_trunc('hour', now()) - interval '3 hours'")" 4 \
   "a finished hour moved to keypal.usage"
is "$(q -c "SELECT sum(requests) FROM keypal.hourly_usage WHERE key_id = '$hid'")" "$((total + 2))" \
   "keypal.hourly_usage: nothing lost or counted twice in the move"
done_testing
