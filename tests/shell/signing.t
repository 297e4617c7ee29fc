#!/usr/bin/env bash
# Request signing for real: the documented client recipes (docs/examples/sign.py and
# sign.js) make signatures keypal_verify_signature accepts; the same signature presented
# by eight sessions at once is accepted exactly once; a signature dated before a server
# restart is refused after it (the replay memory is in shared memory, which a restart
# empties).
source "$(dirname "$0")/lib.sh"
ex="$(dirname "$0")/../../docs/examples"
q -d postgres -c "LOAD 'keypal'" -c "ALTER SYSTEM SET keypal.signing_secret = 'shell test server secret'" -c "SELECT pg_reload_conf()" >/dev/null
trap 'q -d postgres -c "LOAD '"'"'keypal'"'"'" -c "ALTER SYSTEM RESET keypal.signing_secret" -c "SELECT pg_reload_conf()" >/dev/null 2>&1 || true' EXIT
sleep 0.3
read -r id secret < <(q -F ' ' -c "SELECT id, signing_secret FROM keypal_create(owner_id => 'signing', signing => true)")
ok "$( [[ "$secret" == kps_* ]]; echo $? )" "a signing key and its secret"
verify() {  # verify METHOD PATH BODY SIGNATURE (as bind-like psql variables: no quoting trouble)
    q -v m="$1" -v p="$2" -v b="$3" -v s="$4" <<< "SELECT keypal_verify_signature('$id', :'m', :'p', :'b', :'s');"
}

# Signatures dated within 5 s of the start of the server's replay memory are refused (a run
# before a restart may have accepted them); an earlier test may just have restarted it.
accepting() {  # waits (up to 10 s) until fresh signatures verify; prints the last answer
    local got=f i p
    for i in $(seq 40); do
        p="/warm-up/$RANDOM/$i"
        got=$(verify GET "$p" '' "$(python3 "$ex/sign.py" "$secret" GET "$p" '')")
        [ "$got" = t ] && break
        sleep 0.25
    done
    echo "$got"
}
accepting >/dev/null
sig=$(python3 "$ex/sign.py" "$secret" post '/v1/orders?x=1' '{"qty": 2, "note": "ünïcode"}')
is "$(verify POST '/v1/orders?x=1' '{"qty": 2, "note": "ünïcode"}' "$sig")" t "the Python recipe's signature verifies"
is "$(verify POST '/v1/orders?x=1' '{"qty": 2, "note": "ünïcode"}' "$sig")" f "once"
t=${sig%%,*}; t=${t#t=}
is "$(q -v s="$secret" -v t="$t" <<< "SELECT keypal_sign(:'s', 'POST', '/v1/orders?x=1', '{\"qty\": 2, \"note\": \"ünïcode\"}', to_timestamp(:'t'::bigint));")" "$sig" \
   "keypal_sign makes the very same signature"

if command -v node >/dev/null; then
    sig=$(node "$ex/sign.js" "$secret" GET /v1/orders '')
    is "$(verify GET /v1/orders '' "$sig")" t "the Node recipe's signature verifies"
else
    ok 1 "node is not installed (scripts/setup.sh installs nodejs)"
fi

# The replay check writes no table: it works in a READ ONLY transaction, and a rollback
# does not undo it.
sig=$(python3 "$ex/sign.py" "$secret" GET /v1/ro '')
is "$(q -v s="$sig" <<< "BEGIN READ ONLY; SELECT keypal_verify_signature('$id', 'GET', '/v1/ro', '', :'s'); ROLLBACK;")" t \
   "accepted inside a READ ONLY transaction"
is "$(verify GET /v1/ro '' "$sig")" f "and still seen after that transaction rolled back (a replay)"
sig=$(python3 "$ex/sign.py" "$secret" GET /v1/rr '')
is "$(q -v s="$sig" <<< "BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT 1 FROM keypal.keys LIMIT 1; SELECT keypal_verify_signature('$id', 'GET', '/v1/rr', '', :'s'); COMMIT;" | tail -1)" t \
   "accepted inside an older REPEATABLE READ transaction"

# Eight sessions present one signature at once: exactly one is accepted.
sig=$(python3 "$ex/sign.py" "$secret" DELETE /v1/orders/7 '')
work=$(mktemp -d)
for c in 1 2 3 4 5 6 7 8; do
    (verify DELETE /v1/orders/7 '' "$sig" > "$work/$c") &
done
wait
is "$(cat "$work"/* | sort | uniq -c | tr -s ' ' | sed 's/^ //' | tr '\n' ' ')" "7 f 1 t " "eight sessions, one signature: accepted exactly once"
rm -rf "$work"

# After a restart the replay memory is new: what was signed before (up to the skew allowed
# into the future) is refused.
sig=$(python3 "$ex/sign.py" "$secret" PUT /v1/a '')
future=$(python3 -c "import sys; sys.path.insert(0, '$ex'); import sign, time; print(sign.keypal_signature('$secret', 'PUT', '/v1/b', b'', int(time.time()) + 3))")
is "$(verify PUT /v1/b '' "$future")" t "a signature dated 3 s ahead (within the skew) verifies"
restart fast
is "$(verify PUT /v1/a '' "$sig")" f "after a restart, a signature dated before it is refused (it may have been seen)"
is "$(verify PUT /v1/b '' "$future")" f "and the one dated ahead, which the server before had accepted"
is "$(accepting)" t "fresh signatures verify within seconds of the restart"

done_testing
