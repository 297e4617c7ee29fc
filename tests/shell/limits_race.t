#!/usr/bin/env bash
# Eight clients hammer one key at once: the rate limit and the blocking quota admit exactly
# their limit, never more, across connections.
source "$(dirname "$0")/lib.sh"

hammer() {  # hammer KEY ATTEMPTS_PER_CLIENT -> number of valid verifies over 8 clients
    local key=$1 n=$2 dir
    dir=$(mktemp -d)
    for c in 1 2 3 4 5 6 7 8; do
        (for _ in $(seq "$n"); do echo "SELECT (keypal_verify('$key')).valid;"; done | q > "$dir/$c") &
    done
    wait
    cat "$dir"/* | grep -c '^t$' || true
    rm -rf "$dir"
}

rkey=$(q -c "SELECT key FROM keypal_create(owner_id => 'hammer', rate_limit => '{\"requests\": 50, \"window\": \"1h\"}')")
is "$(hammer "$rkey" 20)" 50 "rate limit 50/h: 160 concurrent attempts, exactly 50 admitted"
is "$(q -c "SELECT error_code FROM keypal_verify('$rkey')")" "RATE_LIMITED" "and the next is RATE_LIMITED"

read -r qid qkey < <(q -F ' ' -c "SELECT id, key FROM keypal_create(owner_id => 'hammer', quota => '{\"limit\": 30, \"period\": \"day\"}')")
is "$(hammer "$qkey" 10)" 30 "blocking quota 30/day: 80 concurrent attempts, exactly 30 admitted"
is "$(q -c "SELECT used FROM keypal_usage('$qid')")" 30 "keypal_usage counts 30"

# Rate limits count in shared memory in both modes (the preloaded table, or a dynamic shared
# memory segment): a read-only transaction's verifies count, and a rollback undoes nothing.
ro() {  # three verifies of a fresh 2-per-hour key inside a read-only transaction
    local k
    k=$(q -c "SELECT key FROM keypal_create(owner_id => 'hammer', rate_limit => '{\"requests\": 2, \"window\": \"1h\"}')")
    q -c "BEGIN READ ONLY" -c "SELECT (keypal_verify('$k')).valid" -c "SELECT (keypal_verify('$k')).valid" -c "SELECT (keypal_verify('$k')).valid" -c "COMMIT" | tr '\n' ' '
}
rb() {  # two verifies rolled back, then one more: its remaining count
    local k
    k=$(q -c "SELECT key FROM keypal_create(owner_id => 'hammer', rate_limit => '{\"requests\": 3, \"window\": \"1h\"}')")
    q -c "BEGIN" -c "SELECT (keypal_verify('$k')).valid" -c "SELECT (keypal_verify('$k')).valid" -c "ROLLBACK" >/dev/null
    q -c "SELECT (keypal_verify('$k')).rate_limit_remaining"
}
is "$(q -c "SELECT keypal.shared_memory_available()")" t "the shared-memory limiter is in use"
want_preloaded=$([ "${KEYPAL_TEST_MODE:-plain}" = preload ] && echo t || echo f)
is "$(q -c "SELECT keypal.preloaded()")" "$want_preloaded" "keypal.preloaded() tells the mode"
is "$(ro)" "t t f " "read-only transaction: counted, the third refused"
is "$(rb)" 0 "a rolled-back transaction's verifies still count"

# More keys with live windows than the shared table has slots (64 in the preload test
# cluster): every key still gets exactly its limit.
q -c "CREATE TABLE IF NOT EXISTS many_keys AS SELECT key FROM generate_series(1, 200) i, LATERAL keypal_create(owner_id => 'many' || i, rate_limit => '{\"requests\": 1, \"window\": \"1h\"}')" >/dev/null
is "$(q -c "SELECT count(*) FILTER (WHERE (keypal_verify(key)).valid) FROM many_keys")" 200 "200 keys: each admitted once"
is "$(q -c "SELECT count(*) FILTER (WHERE (keypal_verify(key)).error_code = 'RATE_LIMITED') FROM many_keys")" 200 "and each refused the second time"
if [ "${KEYPAL_TEST_MODE:-plain}" = preload ]; then
    ok "$( [ "$(q -c "SELECT count(*) FROM keypal.rate_state")" -gt 0 ]; echo $? )" "past the shared table's cap, keys fall back to keypal.rate_state"
fi
q -c "DROP TABLE many_keys"
done_testing
