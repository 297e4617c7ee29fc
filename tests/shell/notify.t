#!/usr/bin/env bash
# Events and NOTIFY (SPEC §3): a statement that made many events notifies listeners once, with
# its highest event id; listeners read the outbox from the last id they saw, and find every
# event the statement made there.
source "$(dirname "$0")/lib.sh"

owner="notify_$$"
out=$(psql -X -q -At -v ON_ERROR_STOP=1 <<SQL
LISTEN keypal_events;
SELECT 'before ' || coalesce(max(id), 0) FROM keypal.events;
SELECT count(*) FROM keypal_create_many((SELECT jsonb_agg(jsonb_build_object('owner_id', '$owner')) FROM generate_series(1, 50)));
SELECT 'after ' || max(id) FROM keypal.events;
SELECT keypal_revoke_all('$owner');
SELECT 'revoked ' || max(id) FROM keypal.events;
SQL
)
echo "$out" | sed 's/^/# /'
before=$(echo "$out" | sed -n 's/^before //p')
after=$(echo "$out" | sed -n 's/^after //p')
revoked=$(echo "$out" | sed -n 's/^revoked //p')
notes=$(echo "$out" | grep -c 'Asynchronous notification "keypal_events"' || true)
is "$notes" 2 "two statements that made 50 events each: two notifications"
ok "$(echo "$out" | grep -q "Asynchronous notification \"keypal_events\" with payload \"$after\""; echo $?)" \
   "the create's carries its highest event id ($after)"
ok "$(echo "$out" | grep -q "Asynchronous notification \"keypal_events\" with payload \"$revoked\""; echo $?)" \
   "the revoke's too ($revoked)"
is "$(q -c "SELECT count(*) FROM keypal.events WHERE id > $before AND id <= $after AND event = 'key.created'")" 50 \
   "reading the outbox from the last id seen up to the notified one finds all 50 key.created events"
is "$(q -c "SELECT count(*) FROM keypal.events WHERE id > $after AND id <= $revoked AND event = 'key.revoked'")" 50 \
   "and the next notification's range all 50 key.revoked events"

# A call that makes its keys in two chunks (keypal.create_keys writes 10 000 at a time)
# notifies once, after the last chunk, with the call's highest id.
out=$(psql -X -q -At -v ON_ERROR_STOP=1 <<SQL
LISTEN keypal_events;
SELECT 'before ' || coalesce(max(id), 0) FROM keypal.events;
SELECT count(*) FROM keypal_create_many((SELECT jsonb_agg(jsonb_build_object('owner_id', '${owner}_big')) FROM generate_series(1, 10001)));
SELECT 'after ' || max(id) FROM keypal.events;
SQL
)
before=$(echo "$out" | sed -n 's/^before //p')
after=$(echo "$out" | sed -n 's/^after //p')
is "$(echo "$out" | grep -c 'Asynchronous notification "keypal_events"' || true)" 1 \
   "a call of 10 001 specs (two chunks): one notification"
ok "$(echo "$out" | grep -q "Asynchronous notification \"keypal_events\" with payload \"$after\""; echo $?)" \
   "carrying the call's highest event id ($after)"
is "$(q -c "SELECT count(*) FROM keypal.events WHERE id > $before AND id <= $after AND event = 'key.created'")" 10001 \
   "up to which the outbox holds all 10 001 key.created events"
done_testing
