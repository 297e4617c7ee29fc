#!/usr/bin/env bash
# Webhook delivery to a real HTTP receiver on 127.0.0.1 (tests/shell/receiver.py), by the
# flush worker: the signature checks out with the documented recipe (and fails with another
# secret), 500 twice then 200 is one success after 3 logged attempts, a receiver that never
# answers times out without holding up another webhook, private targets are refused unless
# allowed, a key's events arrive in order, a restart between retries loses nothing, and a
# duplicate (a retry after a timeout the receiver did handle) carries the same event id.
source "$(dirname "$0")/lib.sh"
export PGDATABASE=keypal_hooks
work=$(mktemp -d)
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
python3 "$(dirname "$0")/receiver.py" "$port" whsec_test "$work/log" &
receiver=$!
cleanup() {
    kill "$receiver" 2>/dev/null || true
    psql -X -q -d postgres -c "DROP DATABASE IF EXISTS keypal_hooks WITH (FORCE)" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT
psql -X -q -d postgres -c "DROP DATABASE IF EXISTS keypal_hooks WITH (FORCE)" -c "CREATE DATABASE keypal_hooks" >/dev/null
q -c "CREATE EXTENSION keypal" -c "SELECT keypal_configure(webhook_allow_private => true, webhook_backoff => '300ms', webhook_timeout => '1s')" >/dev/null
for _ in $(seq 50); do [ -n "$(python3 -c "import socket; socket.create_connection(('127.0.0.1', $port))" 2>&1)" ] || break; sleep 0.1; done
url="http://127.0.0.1:$port"

received() {  # received JQ-LIKE-PYTHON-FILTER: lines of the receiver's log that match, as python evaluates
    python3 - "$work/log" "$1" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])] if __import__("os").path.exists(sys.argv[1]) else []
print(eval(sys.argv[2], {"rows": rows}))
EOF
}
wait_received() {  # wait_received EXPR WANT: polls (up to 20 s) until EXPR over the log gives WANT
    poll 200 "$2" received "$1"
}

# 1. Signed, with its event id, the event's payload as body
hook_ok=$(q -c "SELECT keypal_add_webhook('$url/ok', 'whsec_test', '{key.revoked}')")
q -c "SELECT keypal_add_webhook('$url/status/204', 'not_the_receivers_secret', '{key.revoked}')" >/dev/null
read -r id _ < <(q -F ' ' -c "SELECT id, key FROM keypal_create(owner_id => 'hooks')")
q -c "SELECT keypal_revoke('$id')" >/dev/null
ev=$(q -c "SELECT max(id) FROM keypal.events WHERE event = 'key.revoked' AND key_id = '$id'")
is "$(wait_received "len([r for r in rows if r['path'] == '/ok'])" 1)" 1 "a revoke is POSTed to the webhook"
is "$(received "[(r['event_id'], r['sig_ok'], r['content_type'], r['body']['event'], r['body']['data']['keyId']) for r in rows if r['path'] == '/ok']")" \
   "[('$ev', True, 'application/json', 'key.revoked', '$id')]" \
   "with Keypal-Event-Id, a Keypal-Signature the receiver's recipe accepts, the event's payload as JSON"
is "$(wait_received "[r['sig_ok'] for r in rows if r['path'] == '/status/204']" "[False]")" "[False]" \
   "signed with another secret, the same recipe rejects it"
body=$(received "__import__('json').dumps([r['body'] for r in rows if r['path'] == '/ok'][0])")
is "$(q -c "SELECT '$body'::jsonb = payload FROM keypal.events WHERE id = $ev")" t "the body is the event's payload"
is "$(wait_for "SELECT string_agg(status_code::text, ',') FROM keypal.webhook_deliveries WHERE webhook_id = $hook_ok" 200)" 200 \
   "the attempt is logged with its status"

# 2. 500 twice, then 200: one success, three attempts
hook_fail=$(q -c "SELECT keypal_add_webhook('$url/fail/2', 'whsec_test', '{key.revoked}')")
read -r id2 _ < <(q -F ' ' -c "SELECT id, key FROM keypal_create(owner_id => 'hooks')")
q -c "SELECT keypal_revoke('$id2')" >/dev/null
ev2=$(q -c "SELECT max(id) FROM keypal.events WHERE event = 'key.revoked' AND key_id = '$id2'")
is "$(wait_for "SELECT string_agg(attempt || ':' || coalesce(status_code::text, '-'), ' ' ORDER BY attempt) FROM keypal.webhook_deliveries WHERE webhook_id = $hook_fail AND event_id = $ev2" "1:500 2:500 3:200")" \
   "1:500 2:500 3:200" "500 twice then 200: three attempts logged"
is "$(received "[(r['status'], r['duplicate']) for r in rows if r['path'] == '/fail/2']")" "[(500, False), (500, False), (200, False)]" \
   "the receiver handled it exactly once"
is "$(q -c "SELECT count(*) FROM keypal.webhook_queue WHERE webhook_id = $hook_fail")" 0 "nothing left pending"
is "$(q -c "SELECT extract(epoch FROM max(at) - min(at)) > 0.3 FROM keypal.webhook_deliveries WHERE webhook_id = $hook_fail")" t \
   "retries waited (backoff)"

# 3. A receiver that never answers times out and holds up nobody else
q -c "SELECT keypal_remove_webhook(id) FROM keypal.webhooks" >/dev/null
hook_hang=$(q -c "SELECT keypal_add_webhook('$url/hang', 'whsec_test', '{key.created}')")
hook_fast=$(q -c "SELECT keypal_add_webhook('$url/ok', 'whsec_test', '{key.created}')")
: > "$work/log"
t0=$(date +%s%N)
q -c "SELECT count(*) FROM generate_series(1, 20) g, LATERAL keypal_create(owner_id => 'hooks' || g)" >/dev/null
is "$(wait_received "len([r for r in rows if r['path'] == '/ok'])" 20)" 20 "all 20 events reach the answering webhook"
elapsed=$(( ($(date +%s%N) - t0) / 1000000 ))
ok "$( [ "$elapsed" -lt 4000 ]; echo $? )" "in ${elapsed} ms, while the other webhook's receiver hangs"
is "$(wait_for "SELECT count(*) > 0 FROM keypal.webhook_deliveries WHERE webhook_id = $hook_hang AND status_code IS NULL AND error ILIKE '%timed out%'" t)" t \
   "the hanging receiver's attempts end at the timeout, logged as such"
is "$(q -c "SELECT count(*) FROM keypal.webhook_queue WHERE webhook_id = $hook_hang AND dead_at IS NULL")" 20 \
   "and stay pending, to be retried"
q -c "SELECT keypal_remove_webhook($hook_hang)" -c "SELECT keypal_remove_webhook($hook_fast)" >/dev/null

# 4. Private targets are refused unless allowed (resolve, then check)
q -c "SELECT keypal_configure(webhook_allow_private => false)" >/dev/null
hook_priv=$(q -c "SELECT keypal_add_webhook('http://localhost:$port/status/201', 'whsec_test', '{key.created}')")
: > "$work/log"
q -c "SELECT id FROM keypal_create(owner_id => 'private')" >/dev/null
is "$(wait_for "SELECT count(*) FROM keypal.webhook_deliveries WHERE webhook_id = $hook_priv AND error LIKE '%refused%private%'" 1)" 1 \
   "a name that resolves to loopback is refused, and the refusal logged"
is "$(received "len(rows)")" 0 "the receiver got nothing"
q -c "SELECT keypal_remove_webhook($hook_priv)" -c "SELECT keypal_configure(webhook_allow_private => true)" >/dev/null
# Redirects are not followed (a 3xx is a failed attempt): a redirect cannot lead elsewhere.
hook_redir=$(q -c "SELECT keypal_add_webhook('$url/redirect', 'whsec_test', '{key.created}')")
q -c "SELECT id FROM keypal_create(owner_id => 'redirect')" >/dev/null
is "$(wait_for "SELECT count(*) > 0 FROM keypal.webhook_deliveries WHERE webhook_id = $hook_redir AND status_code = 302" t)" t \
   "a 302 answer is logged as a failed attempt"
is "$(received "sorted({r['path'] for r in rows})")" "['/redirect']" "and its Location is never visited"
q -c "SELECT keypal_remove_webhook($hook_redir)" >/dev/null

# 5. A key's events arrive in order, however many are in flight
q -c "SELECT keypal_configure(webhook_concurrency => 4)" >/dev/null
hook_order=$(q -c "SELECT keypal_add_webhook('$url/slow/30', 'whsec_test', '{key.updated}')")
: > "$work/log"
read -r oid _ < <(q -F ' ' -c "SELECT id, key FROM keypal_create(owner_id => 'order')")
read -r oid2 _ < <(q -F ' ' -c "SELECT id, key FROM keypal_create(owner_id => 'order')")
for i in $(seq 10); do q -c "SELECT keypal_update('$oid', name => 'n$i')" -c "SELECT keypal_update('$oid2', name => 'n$i')" >/dev/null; done
is "$(wait_received "len(rows)" 20)" 20 "20 updates of two keys delivered"
is "$(received "all([int(a['event_id']) < int(b['event_id']) for k in {r['body']['data']['keyId'] for r in rows} for a, b in zip([r for r in rows if r['body']['data']['keyId'] == k], [r for r in rows if r['body']['data']['keyId'] == k][1:])])")" True \
   "each key's events arrived in the order they were made"
is "$(received "[r['body']['data']['name'] for r in rows if r['body']['data']['keyId'] == '$oid'][-1]")" n10 "the last one last"
q -c "SELECT keypal_remove_webhook($hook_order)" >/dev/null

# 6. A restart between retries loses no event
q -c "SELECT keypal_configure(webhook_backoff => '2s')" >/dev/null
hook_restart=$(q -c "SELECT keypal_add_webhook('$url/fail/1', 'whsec_test', '{key.revoked}')")
: > "$work/log"
ids=$(q -c "SELECT string_agg(id::text, ' ') FROM generate_series(1, 5) g, LATERAL keypal_create(owner_id => 'restart' || g)")
for i in $ids; do q -c "SELECT keypal_revoke('$i')" >/dev/null; done
is "$(wait_for "SELECT count(*) FROM keypal.webhook_deliveries WHERE webhook_id = $hook_restart" 5)" 5 "five first attempts failed (500)"
restart fast
# After a restart, a worker starts with the first keypal activity; maintenance (as pg_cron
# runs it) starts one when deliveries wait.
q -d keypal_hooks -c "CALL keypal_run_maintenance()" >/dev/null
is "$(wait_for "SELECT count(*) FROM keypal.webhook_deliveries WHERE webhook_id = $hook_restart AND status_code = 200" 5)" 5 \
   "after the restart, all five are delivered"
is "$(received "sorted(r['event_id'] for r in rows if r['status'] == 200) == sorted(set(r['event_id'] for r in rows))")" True \
   "every event the receiver saw ended delivered"
# With keypal preloaded, its launcher starts the worker of every database at start: the
# deliveries resume with no session touching keypal.
q -d postgres -c "ALTER SYSTEM SET shared_preload_libraries = 'keypal'" >/dev/null
ids=$(q -c "SELECT string_agg(id::text, ' ') FROM generate_series(1, 5) g, LATERAL keypal_create(owner_id => 'preload' || g)")
for i in $ids; do q -c "SELECT keypal_revoke('$i')" >/dev/null; done
is "$(wait_for "SELECT count(*) FROM keypal.webhook_deliveries WHERE webhook_id = $hook_restart AND status_code = 500" 10)" 10 \
   "five more first attempts failed"
restart fast
is "$(wait_for "SELECT count(*) FROM keypal.webhook_deliveries WHERE webhook_id = $hook_restart AND status_code = 200" 10)" 10 \
   "preloaded: after the restart, the launcher's worker delivers them, untouched"
# A crash (a backend killed: the postmaster resets every process) likewise.
ids=$(q -c "SELECT string_agg(id::text, ' ') FROM generate_series(1, 5) g, LATERAL keypal_create(owner_id => 'crash' || g)")
for i in $ids; do q -c "SELECT keypal_revoke('$i')" >/dev/null; done
is "$(wait_for "SELECT count(*) FROM keypal.webhook_deliveries WHERE webhook_id = $hook_restart AND status_code = 500" 15)" 15 \
   "five more first attempts failed"
psql -X -q -d postgres -c "SELECT pg_sleep(30)" >/dev/null 2>&1 &
sleeper=$!
sleep 0.5
kill -9 "$(q -d postgres -c "SELECT pid FROM pg_stat_activity WHERE query LIKE '%pg_sleep(30)%' AND pid <> pg_backend_pid() LIMIT 1")"
wait "$sleeper" || true
for _ in $(seq 100); do q -d postgres -c "SELECT 1" >/dev/null 2>&1 && break; sleep 0.2; done
is "$(wait_for "SELECT count(*) FROM keypal.webhook_deliveries WHERE webhook_id = $hook_restart AND status_code = 200" 15)" 15 \
   "preloaded: after a crash, the launcher comes back and the deliveries are made, untouched"
q -d postgres -c "ALTER SYSTEM RESET shared_preload_libraries" >/dev/null
restart fast
q -c "SELECT keypal_remove_webhook($hook_restart)" -c "SELECT keypal_configure(webhook_backoff => '300ms')" >/dev/null

# 7. At least once: a receiver that handled a delivery but answered after the timeout gets
# it again, with the same event id, and can drop the duplicate.
hook_dup=$(q -c "SELECT keypal_add_webhook('$url/slowfirst/1500', 'whsec_test', '{key.revoked}')")
: > "$work/log"
read -r did _ < <(q -F ' ' -c "SELECT id, key FROM keypal_create(owner_id => 'dup')")
q -c "SELECT keypal_revoke('$did')" >/dev/null
is "$(wait_for "SELECT string_agg(coalesce(status_code::text, 'timeout'), ' ' ORDER BY attempt) FROM keypal.webhook_deliveries WHERE webhook_id = $hook_dup" "timeout 200")" \
   "timeout 200" "a timed-out attempt is retried, and the retry succeeds"
is "$(wait_received "sorted(r['duplicate'] for r in rows)" "[False, True]")" "[False, True]" \
   "the receiver saw the same Keypal-Event-Id twice: the second is a duplicate it can drop"

# 8. A webhook enabled (and committed) while a long statement runs gets the events that
# statement writes after that moment, not those written before: each key's events are
# written under a snapshot taken as they are (READ COMMITTED).
q -c "SELECT keypal_remove_webhook(id) FROM keypal.webhooks" >/dev/null
q -c "SELECT count(k.id) FROM generate_series(1, 2) i,
        LATERAL (SELECT 'midway' AS o FROM pg_sleep(CASE WHEN i = 2 THEN 3 ELSE 0 END)) s,
        LATERAL keypal_create(owner_id => s.o, name => 'mid' || i) k" >"$work/midway" &
creator=$!
# (the statement has made its first key and sleeps before the second)
poll 100 1 q -c "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep' AND query LIKE '%midway%'" >/dev/null
hook_mid=$(q -c "SELECT keypal_add_webhook('$url/ok', 'whsec_test', '{key.created}')")
wait "$creator"
is "$(cat "$work/midway")" 2 "one statement made two keys, two seconds apart"
is "$(q -c "SELECT string_agg(k.name, ' ' ORDER BY k.name) FROM keypal.keys k
             WHERE k.owner_id = 'midway' AND (
                   EXISTS (SELECT FROM keypal.webhook_queue w WHERE w.webhook_id = $hook_mid AND w.key_id = k.id)
                OR EXISTS (SELECT FROM keypal.webhook_deliveries d JOIN keypal.events e ON e.id = d.event_id
                            WHERE d.webhook_id = $hook_mid AND e.key_id = k.id))")" "mid2" \
   "the webhook enabled between them is queued the second key's key.created, not the first's"

done_testing
