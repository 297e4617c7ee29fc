#!/usr/bin/env bash
# Durability: usage and quota counts of committed verifies survive a crash
# (pg_ctl stop -m immediate); after the restart verify works at once.
source "$(dirname "$0")/lib.sh"

PGBIN=/usr/lib/postgresql/15/bin
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

read -r id key < <(q -F ' ' -c "SELECT id, key FROM keypal_create(owner_id => 'crash', quota => '{\"limit\": 1000, \"period\": \"day\"}')")
for _ in $(seq 25); do echo "SELECT (keypal_verify('$key')).valid;"; done | q >/dev/null
q -c "SELECT keypal_track_usage('$id', endpoint => '/x', tokens => 7, requests => 5)" >/dev/null

if [ "${KEYPAL_TEST_MODE:-plain}" = preload ]; then
    # With the preload, verify counts quotas in shared memory and the worker writes them
    # every keypal.flush_interval (200 ms here): wait for one flush (the worker may still be
    # starting: it retries its connection every 5 s until the test database exists).
    for _ in $(seq 150); do
        [ "$(q -c "SELECT used FROM keypal.quota_usage WHERE key_id = '$id'")" = 30 ] && break
        sleep 0.1
    done
    is "$(q -c "SELECT used FROM keypal.quota_usage WHERE key_id = '$id'")" 30 "the counts reached keypal.quota_usage (flushed, or counted there past the shared table's cap)"
fi
is "$(q -c "SELECT sum(requests) FROM keypal.hourly_usage WHERE key_id = '$id'")" 30 "and the per-hour usage (25 verifies + 5 tracked)"

as_pg "$PGBIN/pg_ctl" -D "$PGHOST" -m immediate stop >/dev/null
as_pg "$PGBIN/pg_ctl" -D "$PGHOST" -l "$PGHOST/server.log" -w start >/dev/null

is "$(q -c "SELECT used || ' ' || tokens FROM keypal_usage('$id')")" "30 7" "after a crash: 25 verifies + 5 tracked requests and 7 tokens, nothing lost"
is "$(q -c "SELECT valid FROM keypal_verify('$key')")" t "verify works right after the restart"

if [ "${KEYPAL_TEST_MODE:-plain}" = preload ]; then
    # Counted but not yet flushed when the server dies: lost, at most one flush interval's worth.
    for _ in $(seq 9); do echo "SELECT (keypal_verify('$key')).valid;"; done | q >/dev/null
    as_pg "$PGBIN/pg_ctl" -D "$PGHOST" -m immediate stop >/dev/null
    as_pg "$PGBIN/pg_ctl" -D "$PGHOST" -l "$PGHOST/server.log" -w start >/dev/null
    used=$(q -c "SELECT used FROM keypal_usage('$id')")
    ok "$( [ "$used" -ge 30 ] && [ "$used" -le 40 ]; echo $? )" "a crash right after 10 more verifies keeps 30..40 ($used): the loss is bounded by one flush interval"

    # A clean shutdown right after counting: the worker flushes on its way out.
    for _ in $(seq 10); do echo "SELECT (keypal_verify('$key')).valid;"; done | q >/dev/null
    before=$(q -c "SELECT used FROM keypal_usage('$id')")
    as_pg "$PGBIN/pg_ctl" -D "$PGHOST" -m fast -w stop >/dev/null
    as_pg "$PGBIN/pg_ctl" -D "$PGHOST" -l "$PGHOST/server.log" -w start >/dev/null
    is "$(q -c "SELECT used FROM keypal_usage('$id')")" "$before" "a clean restart loses nothing ($before)"

    # The worker keeps the current hour's verified requests in the key's quota_usage row and
    # moves an hour that is over to keypal.usage at its next flush (here: an hour made 3 h old).
    q -c "UPDATE keypal.quota_usage SET hour = date_trunc('hour', now()) - interval '3 hours', hour_requests = 4 WHERE key_id = '$id'"
    total=$(q -c "SELECT sum(requests) FROM keypal.hourly_usage WHERE key_id = '$id'")
    for _ in $(seq 2); do echo "SELECT (keypal_verify('$key')).valid;"; done | q >/dev/null
    for _ in $(seq 150); do
        [ "$(q -c "SELECT hour_requests FROM keypal.quota_usage WHERE key_id = '$id' AND hour = date_trunc('hour', now())")" = 2 ] && break
        sleep 0.1
    done
    is "$(q -c "SELECT requests FROM keypal.usage WHERE key_id = '$id' AND endpoint = '' AND hour = date_trunc('hour', now()) - interval '3 hours'")" 4 \
        "a finished hour moved to keypal.usage"
    is "$(q -c "SELECT hour_requests FROM keypal.quota_usage WHERE key_id = '$id' AND hour = date_trunc('hour', now())")" 2 \
        "the current hour counts on in keypal.quota_usage"
    is "$(q -c "SELECT sum(requests) FROM keypal.hourly_usage WHERE key_id = '$id'")" "$((total + 2))" \
        "keypal.hourly_usage: nothing lost or counted twice in the move"
fi
done_testing
