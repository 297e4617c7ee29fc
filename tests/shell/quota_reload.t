#!/usr/bin/env bash
# keypal_track_usage writes a key's quota use to the table; verify, which counts in shared
# memory, must re-read it — but only once that write has committed.
# Marked before, a verify in another session re-reads the pre-commit use, keeps it as its
# base, and the tracked requests are lost from the count (over-admission).
source "$(dirname "$0")/lib.sh"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

read -r id key < <(q -F ' ' -c "SELECT id, key FROM keypal_create(owner_id => 'reload', quota => '{\"limit\": 100, \"period\": \"day\"}')")
verify() { q -c "SELECT coalesce(error_code, 'VALID') FROM keypal_verify('$key')"; }
is "$(verify)" VALID "first verify (its use loaded: 0)"
# Let the worker write that count, so nothing is in flight when the race below runs.
wait_for "SELECT coalesce((SELECT used FROM keypal.quota_usage WHERE key_id = '$id'), 0)" 1 >/dev/null

coproc TRACKER { psql -X -q -At -v ON_ERROR_STOP=1 2>&1; }
tracker_pid=$TRACKER_PID
ask() { echo "$1" >&"${TRACKER[1]}"; read -r line <&"${TRACKER[0]}"; echo "$line"; }
is "$(ask "BEGIN; SELECT 'tracked' FROM keypal_track_usage('$id', requests => 5);")" tracked "another session tracks 5 requests, not yet committed"
# A verify meanwhile (in the background: it must not wait for the tracking transaction).
verify > "$work/meanwhile" &
meanwhile=$!
sleep 0.5
is "$(ask "COMMIT; SELECT 'committed';")" committed "the tracked requests commit"
wait "$meanwhile"
is "$(cat "$work/meanwhile")" VALID "a verify meanwhile"
exec {TRACKER[1]}>&-
wait "$tracker_pid" 2>/dev/null || true

is "$(q -c "SELECT used FROM keypal_usage('$id')")" 7 "the count holds both verifies and the 5 tracked requests"
is "$(verify)" VALID "a verify after the commit"
is "$(q -c "SELECT used FROM keypal_usage('$id')")" 8 "and counts on from there"
# A transaction left open holding one key's quota row (keypal_track_usage) delays that
# key's write only: another key's counts still reach the table, and the held key's follow
# once the transaction ends.
read -r id2 key2 < <(q -F ' ' -c "SELECT id, key FROM keypal_create(owner_id => 'reload', quota => '{\"limit\": 100, \"period\": \"day\"}')")
before=$(q -c "SELECT used FROM keypal_usage('$id')")
wait_for "SELECT used FROM keypal.quota_usage WHERE key_id = '$id'" "$before" >/dev/null  # all written so far
coproc HOLDER { psql -X -q -At -v ON_ERROR_STOP=1 2>&1; }
holder_pid=$HOLDER_PID
hold() { echo "$1" >&"${HOLDER[1]}"; read -r line <&"${HOLDER[0]}"; echo "$line"; }
is "$(hold "BEGIN; SELECT 'held' FROM keypal_track_usage('$id', requests => 1);")" held "a transaction holds the first key's quota row"
verify >/dev/null
q -c "SELECT (keypal_verify('$key2')).valid" >/dev/null
is "$(wait_for "SELECT coalesce((SELECT used FROM keypal.quota_usage WHERE key_id = '$id2'), 0)" 1)" 1 \
   "the other key's count is written meanwhile"
is "$(q -c "SELECT used FROM keypal.quota_usage WHERE key_id = '$id'")" "$before" "the held key's is not (yet)"
is "$(q -c "SELECT used FROM keypal_usage('$id')")" "$((before + 1))" "but keypal_usage counts it"
hold "COMMIT; SELECT 'done';" >/dev/null
exec {HOLDER[1]}>&-
wait "$holder_pid" 2>/dev/null || true
is "$(wait_for "SELECT used FROM keypal.quota_usage WHERE key_id = '$id'" "$((before + 2))")" "$((before + 2))" \
   "after the commit, the held key's count follows (the verify and the tracked request)"
done_testing
