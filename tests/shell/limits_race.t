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

qkey=$(q -c "SELECT key FROM keypal_create(owner_id => 'hammer', quota => '{\"limit\": 30, \"period\": \"day\"}')")
is "$(hammer "$qkey" 10)" 30 "blocking quota 30/day: 80 concurrent attempts, exactly 30 admitted"
qid=$(q -c "SELECT id FROM keypal.keys WHERE owner_id = 'hammer' AND quota IS NOT NULL")
is "$(q -c "SELECT used FROM keypal_usage('$qid')")" 30 "keypal_usage counts 30"

# In a read-only transaction the limit still decides, but nothing is counted.
okey=$(q -c "SELECT key FROM keypal_create(owner_id => 'hammer', rate_limit => '{\"requests\": 2, \"window\": \"1h\"}')")
is "$(q -c "BEGIN READ ONLY" -c "SELECT (keypal_verify('$okey')).valid" -c "SELECT (keypal_verify('$okey')).valid" -c "SELECT (keypal_verify('$okey')).valid" -c "COMMIT" | tr '\n' ' ')" "t t t " "read-only: decided but not counted"
is "$(q -c "SELECT (keypal_verify('$okey')).rate_limit_remaining")" 1 "so the first writable verify has the whole limit"
done_testing
