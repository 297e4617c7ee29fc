#!/usr/bin/env bash
# Durability of what verify records in shared memory (written behind by the flush worker
# every keypal.flush_interval, 200 ms in the test cluster):
#   - a crash — kill -9 of a backend, or pg_ctl stop -m immediate — under 8-client load
#     loses at most about one flush interval of counts and last uses;
#   - a clean stop under load loses nothing;
#   - a flush that fails in SQL keeps its batch, and the worker goes on.
source "$(dirname "$0")/lib.sh"
# From a settled database: the contract suite before it rolls back tens of thousands of new
# keys, and autovacuum cleaning up after it takes the worker's turns on the CPU under this
# load (a second of counts lost instead of a tenth: DESIGN.md, Durability).
q -c "VACUUM" >/dev/null
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
INTERVAL_MS=$(q -c "SELECT setting FROM pg_settings WHERE name = 'keypal.flush_interval'")
INTERVAL_MS=${INTERVAL_MS:-200}

read -r id key < <(q -F ' ' -c "SELECT id, key FROM keypal_create(owner_id => 'durable', quota => '{\"limit\": 1000000000000, \"period\": \"month\"}')")
used() { q -c "SELECT used FROM keypal_usage('$id')"; }

load() {  # load SECONDS: 8 clients verify the key until stopped; prints how many verifies answered
    rm -f "$work"/c*
    for c in 1 2 3 4 5 6 7 8; do
        (yes "SELECT (keypal_verify('$key')).valid;" | head -n 200000 | psql -X -q -At > "$work/c$c" 2>/dev/null || true) &
    done
}
answered() { cat "$work"/c* | grep -c '^t$' || true; }

# stop_under_load HOW: runs the load, stops the server HOW after 2 s, restarts it, and
# prints "answered used-before used-after seconds".
stop_under_load() {
    local before t0 t1
    before=$(used)
    # A key verified once, early: its last use must survive too.
    read -r early_id early_key < <(q -F ' ' -c "SELECT id, key FROM keypal_create(owner_id => 'durable')")
    q -c "SELECT (keypal_verify('$early_key')).valid" >/dev/null
    t0=$(date +%s%N)
    load
    sleep 2
    case "$1" in
    kill9) kill -9 "$(q -c "SELECT pid FROM pg_stat_activity WHERE query LIKE '%keypal_verify%' AND pid <> pg_backend_pid() LIMIT 1")" ;;
    immediate) as_pg "$PGBIN/pg_ctl" -D "$PGHOST" -m immediate -w stop >/dev/null ;;
    fast) as_pg "$PGBIN/pg_ctl" -D "$PGHOST" -m fast -w stop >/dev/null ;;
    esac
    t1=$(date +%s%N)
    wait
    if [ "$1" != kill9 ]; then
        as_pg "$PGBIN/pg_ctl" -D "$PGHOST" -l "$PGHOST/server.log" -w start >/dev/null
    else
        # The postmaster restarts everything after a backend crash.
        for _ in $(seq 100); do q -c "SELECT 1" >/dev/null 2>&1 && break; sleep 0.1; done
    fi
    echo "$(answered) $before $(used) $(( (t1 - t0) / 1000000 ))"
}

for how in kill9 immediate; do
    read -r n before after ms < <(stop_under_load "$how")
    counted=$((after - before))
    rate=$((n * 1000 / (ms > 0 ? ms : 1)))     # verifies per second
    bound=$((rate * 2 * INTERVAL_MS / 1000 + 50))  # two flush intervals of traffic, and a little
    ok "$( [ "$n" -gt 1000 ]; echo $? )" "$how: the load ran ($n verifies answered in $ms ms)"
    ok "$( [ "$counted" -le $((n + 8)) ] && [ $((n - counted)) -le "$bound" ]; echo $? )" \
       "$how: $counted of $n verifies counted after the crash: at most ~1 flush interval lost ($((n - counted)) <= $bound)"
    is "$(q -c "SELECT count(*) FROM keypal.key_usage WHERE key_id = (SELECT id FROM keypal.keys WHERE owner_id = 'durable' ORDER BY created_at DESC LIMIT 1)")" 1 \
       "$how: a last use recorded 2 s before the crash was written"
    is "$(q -c "SELECT valid FROM keypal_verify('$key')")" t "$how: verify works right after the restart"
done

read -r n before after ms < <(stop_under_load fast)
counted=$((after - before))
ok "$( [ "$counted" -ge "$n" ] && [ "$counted" -le $((n + 8)) ]; echo $? )" \
   "clean stop under load: all $n answered verifies counted ($counted; at most the 8 in flight more)"

# A flush that fails in SQL: its batch stays for the next one, and the worker goes on.
q >/dev/null <<'SQL'
CREATE TABLE IF NOT EXISTS public.fail_flush (on_ boolean);
CREATE OR REPLACE FUNCTION public.fail_flush() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM public.fail_flush) THEN
        RAISE EXCEPTION 'injected flush failure';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER fail_flush BEFORE UPDATE ON keypal.quota_usage
    FOR EACH ROW EXECUTE FUNCTION public.fail_flush();
INSERT INTO public.fail_flush VALUES (true);
SQL
before=$(q -c "SELECT used FROM keypal.quota_usage WHERE key_id = '$id'")
for _ in $(seq 5); do echo "SELECT (keypal_verify('$key')).valid;"; done | q >/dev/null
pid=$(wait_for "SELECT keypal.flush_worker_pid() IS NOT NULL" t >/dev/null; q -c "SELECT keypal.flush_worker_pid()")
sleep 1  # five flush intervals: each one fails
is "$(q -c "SELECT used FROM keypal.quota_usage WHERE key_id = '$id'")" "$before" "while flushes fail, the table is unchanged"
is "$(used)" "$((before + 5))" "and keypal_usage still reports every count"
ok "$(grep -q 'injected flush failure' "$PGHOST/server.log"; echo $?)" "the failure is logged"
q -c "DELETE FROM public.fail_flush" >/dev/null
is "$(wait_for "SELECT used FROM keypal.quota_usage WHERE key_id = '$id'" "$((before + 5))")" "$((before + 5))" \
   "once it passes, the kept batch is written: nothing lost"
is "$(q -c "SELECT keypal.flush_worker_pid()")" "$pid" "by the same worker (it survived the failures)"
q -c "DROP TRIGGER fail_flush ON keypal.quota_usage" -c "DROP TABLE public.fail_flush" -c "DROP FUNCTION public.fail_flush()" >/dev/null
done_testing
