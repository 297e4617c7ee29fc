#!/usr/bin/env bash
# pg_cron, for real: a cluster of its own with shared_preload_libraries = 'pg_cron' (and
# keypal's worker not running maintenance), the recipe of docs/USAGE.md —
#   SELECT cron.schedule('keypal', '* * * * *', 'CALL keypal_run_maintenance()')
# — and a key with revoke_at a few seconds ahead: within about a minute it is revoked, with
# its audit row and key.revoked event.
source "$(dirname "$0")/lib.sh"
dir=$(mktemp -d /tmp/keypal-cron.XXXXXX)
port=$((PGPORT + 7))
cleanup() { bash "$(dirname "$0")/../../scripts/cluster.sh" stop "$dir" 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT
rmdir "$dir"
bash "$(dirname "$0")/../../scripts/cluster.sh" start "$dir" "$port" \
    "shared_preload_libraries = 'pg_cron'" "cron.database_name = 'keypal_cron'" \
    "cron.use_background_workers = on" "max_worker_processes = 32" "keypal.maintenance_interval = 0"
c() { psql -X -q -At -v ON_ERROR_STOP=1 -h "$dir" -p "$port" -U postgres "$@"; }
c -d postgres -c "CREATE DATABASE keypal_cron" >/dev/null
c -d keypal_cron -c "CREATE EXTENSION pg_cron" -c "CREATE EXTENSION keypal" >/dev/null
# batch_size => 1 here, so that the procedure commits between batches inside pg_cron's job.
c -d keypal_cron -c "SELECT cron.schedule('keypal', '* * * * *', 'CALL public.keypal_run_maintenance(batch_size => 1)')" >/dev/null
read -r id < <(c -d keypal_cron -c "SELECT id FROM keypal_create(owner_id => 'cron', revoke_at => now() + interval '5 seconds')")
c -d keypal_cron -c "SELECT count(*) FROM generate_series(1, 3) g, LATERAL keypal_create(owner_id => 'cron' || g, revoke_at => now() + interval '5 seconds')" >/dev/null
is "$(c -d keypal_cron -c "SELECT count(*) FROM keypal.key_timers WHERE key_id = '$id' AND kind = 'revoke'")" 1 "the key's revoke_at is armed"
got=f
for _ in $(seq 90); do
    got=$(c -d keypal_cron -c "SELECT revoked_at IS NOT NULL FROM keypal.keys WHERE id = '$id'")
    [ "$got" = t ] && break
    sleep 1
done
is "$got" t "pg_cron's job revoked the key once its revoke_at passed (within 90 s)"
is "$(c -d keypal_cron -c "SELECT count(*) FROM keypal.audit_log WHERE key_id = '$id' AND action = 'revoked' AND actor = 'schedule'")" 1 \
   "with its audit row"
is "$(c -d keypal_cron -c "SELECT count(*) FROM keypal.events WHERE key_id = '$id' AND event = 'key.revoked'")" 1 "and its key.revoked event"
is "$(c -d keypal_cron -c "SELECT count(*) FROM keypal.keys WHERE owner_id LIKE 'cron%' AND revoked_at IS NOT NULL")" 4 \
   "all four due keys, one batch (and commit) each"
is "$(c -d keypal_cron -c "SELECT count(DISTINCT xmin::text) FROM keypal.keys WHERE owner_id LIKE 'cron%'")" 4 "in four transactions"
is "$(c -d keypal_cron -c "SELECT status FROM cron.job_run_details ORDER BY runid DESC LIMIT 1")" succeeded "the job's run succeeded"
done_testing
