#!/usr/bin/env bash
# A plaintext key passed where a key's id is expected (keypal_revoke('sk_…')) fails in
# PostgreSQL's uuid input, before keypal's code: keypal's emit_log_hook gives that error a
# HINT saying what to pass, and keeps the key out of the message and the server log (the
# statement is not logged). Other uuid errors are left as they are.
source "$(dirname "$0")/lib.sh"

key="sk_live_$(head -c 64 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 32)"
log="$PGHOST/server.log"
# (keypal is loaded in a session by its first keypal call; with shared_preload_libraries, always)
out=$(psql -X -q -v ON_ERROR_STOP=0 -c "SELECT count(*) FROM keypal_stats()" -c "SELECT keypal_revoke('$key')" 2>&1 >/dev/null || true)
echo "$out" | sed 's/^/# /'
ok "$(echo "$out" | grep -q 'ERROR:  invalid input syntax for type uuid: "sk_l…"'; echo $?)" "the error is PostgreSQL's uuid error, the value cut to its first characters"
ok "$(echo "$out" | grep -q "HINT:  this looks like an API key, not a key's id"; echo $?)" "with a HINT saying to pass the key's id"
ok "$( ! echo "$out" | grep -q "${key:8}"; echo $?)" "the key is not in the message the server sends (psql echoes its own query line)"
sleep 0.5
ok "$( ! grep -q "${key:8}" "$log"; echo $?)" "nor in the server log (message or statement)"
ok "$(grep -q 'invalid input syntax for type uuid: "sk_l…"' "$log"; echo $?)" "(which has the error)"
other=$(psql -X -q -v ON_ERROR_STOP=0 -c "SELECT count(*) FROM keypal_stats()" -c "SELECT 'not-a-uuid-but-long-enough'::uuid" 2>&1 >/dev/null || true)
ok "$(echo "$other" | grep -q 'invalid input syntax for type uuid: "not-a-uuid-but-long-enough"' && ! echo "$other" | grep -q HINT; echo $?)" \
   "a uuid error of a statement that calls no keypal function is left as it is"
done_testing
