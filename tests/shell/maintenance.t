#!/usr/bin/env bash
# keypal_run_maintenance under concurrency and at scale: two runs at once over 2000 due
# revocations and 500 expiries do each exactly once (state, audit, events), in many
# committed batches; and the worker runs the same maintenance by itself every
# keypal.maintenance_interval.
source "$(dirname "$0")/lib.sh"
export PGDATABASE=keypal_maint
psql -X -q -d postgres -c "DROP DATABASE IF EXISTS keypal_maint WITH (FORCE)" -c "CREATE DATABASE keypal_maint" >/dev/null
trap 'psql -X -q -d postgres -c "ALTER SYSTEM RESET keypal.maintenance_interval" -c "SELECT pg_reload_conf()" -c "DROP DATABASE IF EXISTS keypal_maint WITH (FORCE)" >/dev/null 2>&1 || true' EXIT
q -c "CREATE EXTENSION keypal" >/dev/null
# The worker's own maintenance off while two CALLs race.
q -d postgres -c "LOAD 'keypal'" -c "ALTER SYSTEM SET keypal.maintenance_interval = 0" -c "SELECT pg_reload_conf()" >/dev/null

q -c "SELECT count(*) FROM generate_series(1, 2000) g, LATERAL keypal_create(owner_id => 'm' || (g % 7), revoke_at => now() + interval '1 day')" >/dev/null
q -c "SELECT count(*) FROM generate_series(1, 500) g, LATERAL keypal_create(owner_id => 'e' || (g % 7), expires_in => '1d')" >/dev/null
# Time passes: the schedules fall due.
q -c "UPDATE keypal.keys SET revoke_at = clock_timestamp() - interval '1 second' WHERE owner_id LIKE 'm%'" \
  -c "UPDATE keypal.keys SET expires_at = clock_timestamp() - interval '1 second' WHERE owner_id LIKE 'e%'" >/dev/null
is "$(q -c "SELECT count(*) FROM keypal.key_timers WHERE due_at <= now()")" 2500 "2500 timers due"
ev0=$(q -c "SELECT coalesce(max(id), 0) FROM keypal.events")

q -c "CALL keypal_run_maintenance(batch_size => 50)" & a=$!
q -c "CALL keypal_run_maintenance(batch_size => 50)" & b=$!
ra=0; wait $a || ra=$?; rb=0; wait $b || rb=$?
is "$ra $rb" "0 0" "two runs at once both succeed"
is "$(q -c "SELECT count(*) FROM keypal.keys WHERE owner_id LIKE 'm%' AND revoked_at = revoke_at")" 2000 "every due key revoked"
is "$(q -c "SELECT count(*), count(DISTINCT key_id) FROM keypal.audit_log WHERE action = 'revoked' AND actor = 'schedule'" | tr '|' ' ')" "2000 2000" \
   "one revoked audit row per key, none twice"
is "$(q -c "SELECT count(*), count(DISTINCT key_id) FROM keypal.events WHERE id > $ev0 AND event = 'key.revoked'" | tr '|' ' ')" "2000 2000" \
   "one key.revoked event per key"
is "$(q -c "SELECT count(*), count(DISTINCT key_id) FROM keypal.events WHERE id > $ev0 AND event = 'key.expired'" | tr '|' ' ')" "500 500" \
   "one key.expired event per expired key"
is "$(q -c "SELECT count(*) FROM keypal.audit_log WHERE action = 'expired'")" 500 "and one expired audit row each"
is "$(q -c "SELECT count(*) FROM keypal.key_timers WHERE due_at <= now()")" 0 "no timer left due"
batches=$(q -c "SELECT count(DISTINCT xmin::text) FROM keypal.keys WHERE owner_id LIKE 'm%'")
ok "$( [ "$batches" -ge 40 ]; echo $? )" "committed in batches ($batches transactions for 2000 revocations at 50 per batch)"
q -c "CALL keypal_run_maintenance()" >/dev/null
is "$(q -c "SELECT count(*) FROM keypal.events WHERE id > $ev0")" 2500 "a third run finds nothing to do"

# Parents and children both due, a key held by another transaction, two runs at once:
# no deadlock, every key once, and the held key's turn comes after it is released.
q -c "SELECT count(*) FROM generate_series(1, 100) g,
        LATERAL (SELECT id FROM keypal_create(owner_id => 'fam' || g, scopes => '{read}', revoke_at => now() + interval '1 day')) p,
        LATERAL keypal_create(owner_id => 'fam' || g, scopes => '{read}', parent_id => p.id, revoke_at => now() + interval '1 day')" >/dev/null
read -r held < <(q -c "SELECT id FROM keypal_create(owner_id => 'held', revoke_at => now() + interval '1 day')")
q -c "UPDATE keypal.keys SET revoke_at = clock_timestamp() - interval '1 second' WHERE owner_id LIKE 'fam%' OR owner_id = 'held'" >/dev/null
au0=$(q -c "SELECT max(id) FROM keypal.audit_log")
psql -X -q -c "BEGIN" -c "SELECT 1 FROM keypal.keys WHERE id = '$held' FOR UPDATE" -c "SELECT pg_sleep(3)" -c "COMMIT" >/dev/null &
holder=$!
sleep 0.5
q -c "CALL keypal_run_maintenance(batch_size => 7)" 2>/dev/null & a=$!
q -c "CALL keypal_run_maintenance(batch_size => 7)" 2>/dev/null & b=$!
ra=0; wait $a || ra=$?; rb=0; wait $b || rb=$?
is "$ra $rb" "0 0" "two runs over parents and children both due: no deadlock, no error"
is "$(q -c "SELECT count(*) FROM keypal.keys WHERE owner_id LIKE 'fam%' AND revoked_at IS NOT NULL")" 200 "every parent and child revoked"
is "$(q -c "SELECT count(*), count(DISTINCT a.key_id) FROM keypal.audit_log a JOIN keypal.keys k ON k.id = a.key_id WHERE k.owner_id LIKE 'fam%' AND a.action = 'revoked'" | tr '|' ' ')" "200 200" \
   "each once in the audit log"
is "$(q -c "SELECT count(*) FROM keypal.audit_log a JOIN keypal.keys k ON k.id = a.key_id WHERE k.owner_id LIKE 'fam%' AND a.id > $au0 AND a.action <> 'revoked'")" 0 \
   "and nothing else: no child revoked by cascade is touched again by its own timer"
is "$(q -c "SELECT count(*) FROM keypal.keys WHERE owner_id LIKE 'fam%' AND revoked_at > revoke_at")" 0 \
   "no revocation moved later"
is "$(q -c "SELECT revoked_at IS NULL FROM keypal.keys WHERE id = '$held'")" t "the key another transaction held is left for later"
wait $holder
sleep 5
q -c "CALL keypal_run_maintenance()" >/dev/null
is "$(q -c "SELECT revoked_at IS NOT NULL FROM keypal.keys WHERE id = '$held'")" t "and revoked once it is free"

# Maintenance shares its work by SKIP LOCKED, which needs READ COMMITTED: refused otherwise.
is "$(PGOPTIONS='-c default_transaction_isolation=repeatable\ read' psql -X -q -At -c "CALL keypal_run_maintenance()" 2>&1 | grep -c 'runs at READ COMMITTED')" 1 \
   "at REPEATABLE READ it refuses, naming the isolation it needs"

# The worker, every keypal.maintenance_interval
q -d postgres -c "ALTER SYSTEM SET keypal.maintenance_interval = '1s'" -c "SELECT pg_reload_conf()" >/dev/null
sleep 0.5
read -r wid < <(q -c "SELECT id FROM keypal_create(owner_id => 'w', revoke_at => now() + interval '2 seconds')")
is "$(wait_for "SELECT revoked_at IS NOT NULL FROM keypal.keys WHERE id = '$wid'" t)" t \
   "with keypal.maintenance_interval = 1s, the worker applies a revoke_at by itself"
is "$(q -c "SELECT count(*) FROM keypal.events WHERE event = 'key.revoked' AND key_id = '$wid'")" 1 "with its event"
pid=$(q -c "SELECT keypal.flush_worker_pid()")
ok "$( [ -n "$pid" ]; echo $? )" "a worker was started for it (pid $pid), by the key's schedule"

done_testing
