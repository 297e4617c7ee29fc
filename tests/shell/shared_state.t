#!/usr/bin/env bash
# The shared state verify records into: bounded by keypal.shared_memory with a stated
# behaviour when full, entries evicted once idle and written, and the same behaviour with
# keypal in shared_preload_libraries (which only places its root in the main shared memory).
source "$(dirname "$0")/lib.sh"
stat() { q -c "SELECT value FROM keypal_stats() WHERE name = '$1'"; }
restore() {
    q -c "LOAD 'keypal'" -c "ALTER SYSTEM RESET keypal.shared_memory" -c "ALTER SYSTEM RESET shared_preload_libraries" -c "SELECT pg_reload_conf()" >/dev/null 2>&1 || true
    q -c "DROP TABLE IF EXISTS full_keys" >/dev/null 2>&1 || true
}
trap restore EXIT

# Memory full: 1 MB holds about 2 500 entries. 3 000 keys with a 2-second rate window,
# from an empty shared state (a restart empties it).
restart
q -c "CREATE TABLE full_keys AS SELECT c.key FROM generate_series(1, 3000) i, LATERAL keypal_create(owner_id => 'full' || i, rate_limit => '{\"requests\": 5, \"window\": \"2s\"}') c" >/dev/null
read -r pid pkey < <(q -F ' ' -c "SELECT id, key FROM keypal_create(owner_id => 'full')")
q -c "LOAD 'keypal'" -c "ALTER SYSTEM SET keypal.shared_memory = '1MB'" -c "SELECT pg_reload_conf()" >/dev/null
sleep 0.3
max=$(stat shared_entries_max)
ok "$( [ "$max" -gt 1000 ] && [ "$max" -lt 3000 ]; echo $? )" "1 MB: room for $max entries ($(stat shared_entry_bytes) bytes each)"
out=$(q -c "SELECT tap.err(format('SELECT keypal_verify(%L)', key)) AS e, count(*) FROM full_keys GROUP BY 1 ORDER BY 1")
echo "$out" | sed 's/^/# /'
full=$(echo "$out" | grep '^53200' | cut -d'|' -f2)
fine=$(echo "$out" | grep '^no error' | cut -d'|' -f2)
ok "$( [ "${full:-0}" -gt 0 ] && [ "${fine:-0}" -gt 1000 ] && [ $(( ${full:-0} + ${fine:-0} )) = 3000 ]; echo $? )" \
   "full: keys with a limit and no entry fail with SQLSTATE 53200 (${full:-0}), the others are decided (${fine:-0})"
msg=$(q -c "SELECT keypal_verify(key) FROM full_keys" 2>&1 || true)
ok "$(echo "$msg" | grep -q 'shared memory for usage is full'; echo $?)" "the error says what is full and which setting to raise"
dropped=$(stat dropped_uses)
is "$(q -c "SELECT valid FROM keypal_verify('$pkey')")" t "a key without limits still verifies when memory is full"
is "$(stat dropped_uses)" "$((dropped + 1))" "and its unrecorded use is counted in dropped_uses"

# Idle entries go once written and their windows are over (2 s here, idle after 10 s).
q -c "LOAD 'keypal'" -c "ALTER SYSTEM RESET keypal.shared_memory" -c "SELECT pg_reload_conf()" >/dev/null
sleep 0.3
before=$(stat shared_entries)
for _ in $(seq 40); do
    [ "$(stat shared_entries)" -lt 100 ] && break
    sleep 0.5
done
after=$(stat shared_entries)
ok "$( [ "$after" -lt 100 ]; echo $? )" "idle entries are evicted ($before -> $after)"
is "$(q -c "SELECT count(*) FILTER (WHERE (keypal_verify(key)).valid) FROM full_keys")" 3000 "and every key verifies again"

# DROP EXTENSION in a database: its worker drops what keypal counted there and leaves (so
# DROP DATABASE, without FORCE, can go ahead).
q -d postgres -c "DROP DATABASE IF EXISTS keypal_scratch WITH (FORCE)" -c "CREATE DATABASE keypal_scratch" >/dev/null
sk=$(q -d keypal_scratch -c "CREATE EXTENSION keypal" -c "SELECT key FROM keypal_create(owner_id => 'scratch', rate_limit => '{\"requests\": 9, \"window\": \"1h\"}')")
is "$(q -d keypal_scratch -c "SELECT valid FROM keypal_verify('$sk')")" t "a second database verifies"
wpid=$(wait_for "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'keypal flush worker' AND datname = 'keypal_scratch'" 1)
is "$wpid" 1 "and gets its own flush worker"
before=$(stat shared_entries)
q -d keypal_scratch -c "DROP EXTENSION keypal" >/dev/null
is "$(wait_for "SELECT count(*) FROM pg_stat_activity WHERE datname = 'keypal_scratch'" 0)" 0 "after DROP EXTENSION its worker leaves"
ok "$( [ "$(stat shared_entries)" -lt "$before" ]; echo $? )" "taking that database's entries with it ($before -> $(stat shared_entries))"
out=$(q -d postgres -c "DROP DATABASE keypal_scratch" 2>&1 || true)
is "$out" "" "DROP DATABASE (without FORCE) then succeeds"

# Preloaded: one behaviour.
q -c "ALTER SYSTEM SET shared_preload_libraries = 'keypal'" >/dev/null
restart
is "$(q -c "SHOW shared_preload_libraries")" keypal "restarted with keypal preloaded"
read -r qid qkey < <(q -F ' ' -c "SELECT id, key FROM keypal_create(owner_id => 'pre', quota => '{\"limit\": 3, \"period\": \"day\"}')")
is "$(q -c "BEGIN READ ONLY" -c "SELECT (keypal_verify('$qkey')).valid" -c "SELECT (keypal_verify('$qkey')).valid" -c "SELECT (keypal_verify('$qkey')).valid" -c "SELECT (keypal_verify('$qkey')).error_code" -c "COMMIT" | tr '\n' ' ')" \
   "t t t QUOTA_EXCEEDED " "preloaded: a read-only transaction's verifies count against the quota"
is "$(wait_for "SELECT used FROM keypal.quota_usage WHERE key_id = '$qid'" 3)" 3 "and the flush worker writes them"
q -c "ALTER SYSTEM RESET shared_preload_libraries" >/dev/null
restart
is "$(q -c "SHOW shared_preload_libraries")" "" "back to no preload"
is "$(q -c "SELECT error_code FROM keypal_verify('$qkey')")" QUOTA_EXCEEDED "the count carried over through the table"
done_testing
