#!/usr/bin/env bash
# Behaviour that needs committed data, separate transactions or a real login:
# identity does not leak, a plain login role, read-only verify, last_used_at vs revoke.
source "$(dirname "$0")/lib.sh"

read -r id key < <(q -F ' ' -c "SELECT id, key FROM keypal_create(owner_id => 'sess', scopes => '{read}')")

# The authenticated identity lives for one transaction only.
got=$(q -c "BEGIN" -c "SELECT (keypal_authenticate('$key')).owner_id" -c "SELECT keypal_current_owner()" -c "COMMIT" -c "SELECT coalesce(keypal_current_owner(), 'none')")
is "$(echo "$got" | tr '\n' ' ')" "sess sess none " "identity set in a transaction is gone in the next"
got=$(q -c "SELECT (keypal_authenticate('$key')).valid" -c "SELECT coalesce(keypal_current_owner(), 'none')")
is "$(echo "$got" | tr '\n' ' ')" "t none " "autocommit authenticate does not leak into the next statement"
got=$(q -c "BEGIN" -c "SELECT (keypal_authenticate('$key')).valid" -c "ROLLBACK" -c "SELECT coalesce(keypal_current_owner(), 'none')")
is "$(echo "$got" | tr '\n' ' ')" "t none " "nor past a rollback"

# A plain login role that was granted nothing: verify yes, everything else no.
is "$(q -U keypal_plain -c "SELECT valid FROM keypal_verify('$key', 'read')")" "t" "keypal_plain (login) can verify"
is "$(q -U keypal_plain -c "SELECT (keypal_authenticate('$key')).owner_id")" "sess" "and authenticate"
out=$(q -U keypal_plain -c "SELECT * FROM keypal_create(owner_id => 'x')" 2>&1 || true)
ok "$(echo "$out" | grep -q 'permission denied'; echo $?)" "keypal_plain cannot create"
out=$(q -U keypal_plain -c "SELECT count(*) FROM keypal.keys" 2>&1 || true)
ok "$(echo "$out" | grep -q 'permission denied'; echo $?)" "keypal_plain cannot read keypal.keys"
out=$(q -U keypal_plain -c "SELECT count(*) FROM keypal.audit_log" 2>&1 || true)
ok "$(echo "$out" | grep -q 'permission denied'; echo $?)" "keypal_plain cannot read the audit log"

# Verify works in a read-only transaction; what it records counts there too (written
# behind by the flush worker, not by the caller's transaction).
read -r rid rkey < <(q -F ' ' -c "SELECT id, key FROM keypal_create(owner_id => 'sess')")
is "$(q -c "BEGIN READ ONLY" -c "SELECT valid FROM keypal_verify('$rkey')" -c "COMMIT")" "t" "verify in a read-only transaction"
is "$(q -c "SELECT last_used_at IS NOT NULL FROM keypal.key_info WHERE id = '$rid'")" "t" "which recorded the use at once (key_info)"
is "$(wait_for "SELECT count(*) FROM keypal.key_usage WHERE key_id = '$rid'" 1)" "1" "and the flush worker wrote it to keypal.key_usage"
is "$(q -c "SELECT last_used_at FROM keypal.keys WHERE id = '$rid'")" "" "(keypal.keys itself is not written)"
is "$(q -c "SET default_transaction_read_only = on" -c "SELECT valid FROM keypal_verify('$rkey')")" "t" "verify with default_transaction_read_only"

# last_used_at: written after the first verify, then at most once per resolution.
q -c "SELECT keypal_configure(last_used_resolution => '60s')" >/dev/null
read -r lid lkey < <(q -F ' ' -c "SELECT id, key FROM keypal_create(owner_id => 'sess')")
q -c "SELECT valid FROM keypal_verify('$lkey')" >/dev/null
is "$(wait_for "SELECT count(*) FROM keypal.key_usage WHERE key_id = '$lid'" 1)" "1" "first verify's use is written"
first=$(q -c "SELECT last_used_at FROM keypal.key_usage WHERE key_id = '$lid'")
q -c "SELECT valid FROM keypal_verify('$lkey')" >/dev/null
sleep 0.6  # three flush intervals
is "$(q -c "SELECT last_used_at FROM keypal.key_usage WHERE key_id = '$lid'")" "$first" "a second verify within the resolution is not written"
ok "$( [ "$(q -c "SELECT last_used_at > '$first' FROM keypal.key_info WHERE id = '$lid'")" = t ]; echo $? )" "though keypal_get's last_used_at has it"
# One flush with a row to move on and a key without a row: both written.
q -c "SELECT keypal_configure(last_used_resolution => '1s')" >/dev/null
sleep 1.2
read -r nid nkey < <(q -F ' ' -c "SELECT id, key FROM keypal_create(owner_id => 'sess')")
q -c "SELECT (keypal_verify('$lkey')).valid AND (keypal_verify('$nkey')).valid" >/dev/null
is "$(wait_for "SELECT count(*) FROM keypal.key_usage WHERE key_id = '$nid'" 1)" 1 "a new key's first use is written beside a moved one"
is "$(q -c "SELECT last_used_at > '$first' FROM keypal.key_usage WHERE key_id = '$lid'")" t "and the moved one moved"
first=$(q -c "SELECT last_used_at FROM keypal.key_usage WHERE key_id = '$lid'")
q -c "SELECT keypal_configure(last_used_resolution => '0s')" >/dev/null
q -c "SELECT valid FROM keypal_verify('$lkey')" >/dev/null
is "$(wait_for "SELECT last_used_at > '$first' FROM keypal.key_usage WHERE key_id = '$lid'" t)" t "resolution 0: every verify's use is written"

# A verify while a revoke holds the key's row neither waits nor undoes the revoke (nor
# does the flush worker's last_used_at write: it skips rows another transaction holds).
coproc REVOKER { psql -X -q -At -v ON_ERROR_STOP=1 2>&1; }
revoker_pid=$REVOKER_PID
echo "BEGIN; SELECT keypal_revoke('$id'); SELECT 'locked';" >&"${REVOKER[1]}"
read -r line <&"${REVOKER[0]}"; read -r line <&"${REVOKER[0]}"
is "$line" "locked" "a revoke holds the key's row"
start=$(date +%s%N)
is "$(q -c "SET lock_timeout = '5s'" -c "SELECT valid FROM keypal_verify('$key')")" "t" "verify during the uncommitted revoke still sees the key valid"
elapsed_ms=$(( ($(date +%s%N) - start) / 1000000 ))
ok "$( [ "$elapsed_ms" -lt 4000 ]; echo $? )" "and did not wait for the revoke's lock (${elapsed_ms} ms)"
echo "COMMIT; SELECT 'committed';" >&"${REVOKER[1]}"
read -r line <&"${REVOKER[0]}"
is "$line" "committed" "the revoke commits"
exec {REVOKER[1]}>&-
wait "$revoker_pid" 2>/dev/null || true
is "$(q -c "SELECT error_code FROM keypal_verify('$key')")" "REVOKED" "the key is revoked: the last_used_at write undid nothing"
is "$(q -c "SELECT revoked_at IS NOT NULL FROM keypal.keys WHERE id = '$id'")" "t" "revoked_at is kept"
q -c "SELECT keypal_configure(last_used_resolution => '60s')" >/dev/null

# Each backend caches the settings verify needs; a change committed elsewhere reaches it.
coproc WATCHER { psql -X -q -At -v ON_ERROR_STOP=1 2>&1; }
watcher_pid=$WATCHER_PID
ask() { echo "$1" >&"${WATCHER[1]}"; read -r line <&"${WATCHER[0]}"; echo "$line"; }
is "$(ask "SELECT error_code FROM keypal_verify('zz_' || repeat('a', 32));")" "INVALID_FORMAT" "a long-lived session: zz_ keys are not the configured format"
q -c "SELECT keypal_configure(prefix => 'zz_')" >/dev/null
is "$(ask "SELECT error_code FROM keypal_verify('zz_' || repeat('a', 32));")" "INVALID_KEY" "after another session configured prefix zz_, the same session sees it"
q -c "SELECT keypal_configure(prefix => '')" >/dev/null
# DROP/CREATE EXTENSION under a session that has verified before: its cache must not go stale.
q -c "DROP EXTENSION keypal CASCADE" -c "CREATE EXTENSION keypal" >/dev/null
read -r key2 < <(q -c "SELECT key FROM keypal_create(owner_id => 'recreated')")
is "$(ask "SELECT valid FROM keypal_verify('$key2');")" "t" "the same session verifies keys of a re-created extension"
# A settings change committed while a REPEATABLE READ session is open: once the change's
# invalidation arrives there, the cache reloads with the change, not the old snapshot's view.
is "$(ask "BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT error_code FROM keypal_verify('yy_' || repeat('a', 32));")" \
   "INVALID_FORMAT" "REPEATABLE READ session: yy_ keys are not the configured format"
q -c "SELECT keypal_configure(prefix => 'yy_')" >/dev/null
is "$(ask "SELECT error_code FROM keypal_verify('yy_' || repeat('a', 32));")" "INVALID_KEY" \
   "the same REPEATABLE READ transaction sees the committed prefix (the cache loads under a fresh snapshot)"
is "$(ask "COMMIT; SELECT error_code FROM keypal_verify('yy_' || repeat('a', 32));")" "INVALID_KEY" "and keeps it after COMMIT"
q -c "SELECT keypal_configure(prefix => '')" >/dev/null
exec {WATCHER[1]}>&-
wait "$watcher_pid" 2>/dev/null || true

# ignore_system_indexes would turn each lookup into a scan of every key: verify refuses.
out=$(PGOPTIONS="-c ignore_system_indexes=on" q -c "SELECT valid FROM keypal_verify('$key2')" 2>&1 || true)
ok "$(echo "$out" | grep -q 'ignore_system_indexes'; echo $?)" "verify refuses to run with ignore_system_indexes"
done_testing
