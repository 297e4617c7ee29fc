#!/usr/bin/env bash
# A plaintext key passed where a key's id is expected (keypal_revoke('sk_…')) fails in
# PostgreSQL's uuid input, before keypal's code: keypal's emit_log_hook gives that error a
# HINT saying what to pass, and keeps the key out of the message and the server log (no
# statement, no PL/pgSQL query line). Other uuid errors are left as they are.
source "$(dirname "$0")/lib.sh"

key="sk_live_$(head -c 64 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 32)"
secret=${key:12}   # what must not be seen (the first characters may be)
log="$PGHOST/server.log"
# Runs SQL after a keypal call (keypal is loaded in a session by its first keypal call; with
# shared_preload_libraries, always) and prints the server's error lines (not psql's echo).
err() { psql -X -q -v ON_ERROR_STOP=0 -v VERBOSITY=default -c "SELECT count(*) FROM keypal_stats()" -c "$1" 2>&1 >/dev/null | grep -E '^(ERROR|HINT|DETAIL|CONTEXT|QUERY):' || true; }

out=$(err "SELECT keypal_revoke('$key')")
echo "$out" | sed 's/^/# /'
ok "$(echo "$out" | grep -q '^ERROR:  invalid input syntax for type uuid: "sk_l\.\.\."'; echo $?)" "the error is PostgreSQL's uuid error, the value cut to its first characters"
ok "$(echo "$out" | grep -q "^HINT:  this looks like an API key, not a key's id"; echo $?)" "with a HINT saying to pass the key's id"
ok "$( ! echo "$out" | grep -q "$secret"; echo $?)" "the key is not in what the server sends"
out=$(err "DO \$\$ BEGIN PERFORM keypal_revoke('$key'); END \$\$")
echo "$out" | sed 's/^/# /'
ok "$(echo "$out" | grep -q '^HINT:  this looks like an API key' && ! echo "$out" | grep -q "$secret"; echo $?)" \
   "from PL/pgSQL too, without the query line that would show it"
sleep 0.5
ok "$( ! grep -q "$secret" "$log"; echo $?)" "the key is in the server log nowhere (message, statement, query, context)"
ok "$(grep -q 'invalid input syntax for type uuid: "sk_l\.\.\."' "$log"; echo $?)" "(which has the errors)"
other=$(err "SELECT 'not-a-uuid-but-long-enough'::uuid")
ok "$(echo "$other" | grep -q 'invalid input syntax for type uuid: "not-a-uuid-but-long-enough"' && ! echo "$other" | grep -q HINT; echo $?)" \
   "a uuid error of a statement that calls no keypal function is left as it is"
typo=$(err "SELECT keypal_revoke('6f9619ff-8b86-d011-b42d-00c04fc964f')")
ok "$(echo "$typo" | grep -q '"6f9619ff-8b86-d011-b42d-00c04fc964f"' && ! echo "$typo" | grep -q HINT; echo $?)" \
   "and a mistyped uuid passed to keypal is shown as it is, with no key hint"
done_testing
