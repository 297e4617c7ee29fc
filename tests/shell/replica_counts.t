#!/usr/bin/env bash
# keypal.replica_counts on a primary, each call its own transaction as a standby's worker
# makes it: a batch is added once per number, a later number is added, another standby's are
# numbered apart, an older number adds nothing; a batch whose transaction rolls back adds
# nothing and leaves its number free; the primary's verify decides on what the standbys
# shipped, and its worker writes the shipped quota use and last use to the tables.
source "$(dirname "$0")/lib.sh"

DB=keypal_rc
d() { q -d $DB "$@"; }
trap 'q -d postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true' EXIT
q -d postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB" >/dev/null 2>&1
d -c "CREATE EXTENSION keypal" >/dev/null
read -r id key < <(d -F ' ' -c "SELECT id, key FROM keypal_create(owner_id => 'rc', rate_limit => '{\"requests\": 10, \"window\": \"1m\"}', quota => '{\"limit\": 100, \"period\": \"day\"}')")
hex=${id//-/}
day=$(d -c "SELECT ((extract(epoch FROM date_trunc('day', now(), 'UTC')) - 946684800) * 1e6)::bigint")
ship() {  # ship REPLICA NUMBER QUOTA RATE: the key's global quota use the primary answers
    local idx r
    idx=$(d -c "SELECT floor((extract(epoch FROM clock_timestamp()) - 946684800) * 1e6 / 3000000)::bigint")
    if [ "$4" = 0 ]; then r='[]'; else r="[[$idx,$4]]"; fi
    d -c "SELECT (keypal.replica_counts('$1', $2, '[{\"k\":\"$hex\",\"l\":$((day + 1)),\"h\":[[$day,$3]],\"q\":[$day,$3],\"r\":[60000000,$r]}]')::jsonb) -> 0 -> 'q' ->> 1"
}
is "$(ship s1 1 6 6)" 6 "a first batch: 6 counted"
is "$(ship s1 1 6 6)" 6 "the same batch again (its answer lost): answered, not added"
is "$(ship s1 2 1 1)" 7 "the next batch is added"
is "$(ship s2 1 2 2)" 9 "another standby's batches are numbered apart"
is "$(ship s1 1 5 5)" 9 "an older number adds nothing"
is "$(d -c "BEGIN" -c "SELECT keypal.replica_counts('s1', 3, '[{\"k\":\"$hex\",\"q\":[$day,50]}]') IS NOT NULL" -c "ROLLBACK")" t "a batch in a transaction that rolls back"
is "$(ship s1 3 1 0)" 10 "adds nothing, and its number is free for the batch sent again"
is "$(d -v VERBOSITY=verbose -c "BEGIN ISOLATION LEVEL SERIALIZABLE" -c "SELECT keypal.replica_counts('s1', 4, '[]')" 2>&1 | grep -o '0A000' | head -1)" 0A000 \
   "a SERIALIZABLE transaction is refused (its commit could fail after the batch was added)"
is "$(d -c "SELECT string_agg(replica || '=' || batch, ' ' ORDER BY replica) FROM keypal.replica_batches")" "s1=3 s2=1" \
   "the last batch of each standby is recorded"
is "$(d -c "SELECT (v.rate_limit_remaining, v.quota_remaining)::text FROM keypal_verify('$key') v")" "(0,89)" \
   "the primary decides on the global count: 9 admitted on standbys + this one, of 10 a minute; quota 100 - 11"
is "$(d -c "SELECT (keypal_verify('$key')).error_code")" RATE_LIMITED "then refuses"
is "$(poll 150 "11 true" d -c "SELECT (SELECT used FROM keypal.quota_usage WHERE key_id = '$id') || ' ' || (SELECT (last_used_at IS NOT NULL)::text FROM keypal.key_usage WHERE key_id = '$id')")" "11 true" \
   "the primary's worker writes the shipped quota use (with its own) and the last use"
done_testing
