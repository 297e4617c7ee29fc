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
done_testing
