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

# Limits count in shared memory, never in the caller's transaction: counts made in a
# read-only, REPEATABLE READ or SERIALIZABLE transaction count, and a rollback undoes
# nothing (a PostgREST GET runs read-only: it must not bypass a quota).
in_tx() {  # in_tx "BEGIN ..." SETTINGS: three verifies of a fresh 2-per-hour key in one transaction
    local k
    k=$(q -c "SELECT key FROM keypal_create(owner_id => 'hammer', $2)")
    q -c "$1" -c "SELECT (keypal_verify('$k')).valid" -c "SELECT (keypal_verify('$k')).valid" -c "SELECT (keypal_verify('$k')).valid" -c "COMMIT" | tr '\n' ' '
}
rb() {  # two verifies rolled back, then one more: its remaining count
    local k
    k=$(q -c "SELECT key FROM keypal_create(owner_id => 'hammer', $1)")
    q -c "BEGIN" -c "SELECT (keypal_verify('$k')).valid" -c "SELECT (keypal_verify('$k')).valid" -c "ROLLBACK" >/dev/null
    q -c "SELECT (keypal_verify('$k')).$2"
}
rate="rate_limit => '{\"requests\": 2, \"window\": \"1h\"}'"
quota="quota => '{\"limit\": 2, \"period\": \"day\"}'"
for tx in "BEGIN READ ONLY" "BEGIN ISOLATION LEVEL REPEATABLE READ" "BEGIN ISOLATION LEVEL SERIALIZABLE" "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"; do
    is "$(in_tx "$tx" "$rate")" "t t f " "rate limit, $tx: counted, the third refused"
    is "$(in_tx "$tx" "$quota")" "t t f " "blocking quota, $tx: counted, the third refused"
done
is "$(rb "rate_limit => '{\"requests\": 3, \"window\": \"1h\"}'" rate_limit_remaining)" 0 "a rolled-back transaction's verifies still count (rate limit)"
is "$(rb "quota => '{\"limit\": 3, \"period\": \"day\"}'" quota_remaining)" 0 "and against a quota"

# Many keys with live windows at once: every key gets exactly its limit.
q -c "CREATE TABLE IF NOT EXISTS many_keys AS SELECT key FROM generate_series(1, 2000) i, LATERAL keypal_create(owner_id => 'many' || i, rate_limit => '{\"requests\": 1, \"window\": \"1h\"}')" >/dev/null
is "$(q -c "SELECT count(*) FILTER (WHERE (keypal_verify(key)).valid) FROM many_keys")" 2000 "2000 keys: each admitted once"
is "$(q -c "SELECT count(*) FILTER (WHERE (keypal_verify(key)).error_code = 'RATE_LIMITED') FROM many_keys")" 2000 "and each refused the second time"
q -c "DROP TABLE many_keys"
done_testing
