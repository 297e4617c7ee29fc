#!/usr/bin/env bash
# Beyond one server: a primary and two streaming standbys on this machine (pg_basebackup).
#   - keypal_configure(limit_split => 3): one limited key verified through all three at once
#     is admitted exactly its limit in all, each server at most its share;
#   - global limits (no split): each standby ships what it counted to the primary (as a role
#     granted only keypal.replica_counts); every server decides on the key's global count:
#     one server's admissions are refused on the others, a standby's quota use and last use
#     reach the primary's tables within two flush intervals, and three servers verifying at
#     once over-admit no more than the others admitted within two intervals;
#   - a revoke on the primary is REVOKED on both standbys as soon as they replay it;
#   - two databases: each ships to its own, a key both hold (same id) counted apart;
#   - a batch the primary refuses for good is given up (its counts stay on the standby), not
#     sent again forever;
#   - a standby cut off from its primary keeps verifying, and catches up when it is back:
#     it replays what it missed and ships what it counted meanwhile.
# Its own database (keypal_replicas), so its settings touch no other test.
source "$(dirname "$0")/lib.sh"

DB=keypal_replicas
S1=${PGHOST}-replica1
S2=${PGHOST}-replica2
P1=$((PGPORT + 101))
P2=$((PGPORT + 102))
on() { local dir=$1 port=$2; shift 2; psql -X -q -At -v ON_ERROR_STOP=1 -h "$dir" -p "$port" -d $DB "$@"; }
pq() { q -d $DB "$@"; }
s1() { on "$S1" "$P1" "$@"; }
s2() { on "$S2" "$P2" "$@"; }
stop_standbys() {
    for d in "$S1" "$S2"; do
        bash "$CLUSTER" stop "$d" 2>/dev/null || true
        rm -rf "$d"
    done
}
cleanup() {
    # The primary must be up for the next test, whatever happened here.
    as_pg "$PGBIN/pg_ctl" -D "$PGHOST" status >/dev/null 2>&1 ||
        as_pg "$PGBIN/pg_ctl" -D "$PGHOST" -l "$PGHOST/server.log" -w start >/dev/null
    stop_standbys
    q -d postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "DROP DATABASE IF EXISTS ${DB}2 WITH (FORCE)" \
        -c "DROP ROLE IF EXISTS keypal_ship" >/dev/null 2>&1 || true
}
trap cleanup EXIT

q -d postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB" >/dev/null 2>&1
pq -c "CREATE EXTENSION keypal" >/dev/null
# The standbys ship their counts as a role that may do nothing else.
q -d postgres -c "DROP ROLE IF EXISTS keypal_ship" -c "CREATE ROLE keypal_ship LOGIN" >/dev/null
pq -c "GRANT EXECUTE ON FUNCTION keypal.replica_counts(text, bigint, text) TO keypal_ship" >/dev/null
for s in "$S1:$P1" "$S2:$P2"; do
    bash "$CLUSTER" standby "${s%:*}" "${s#*:}" "$PGHOST" "$PGPORT" \
        "wal_retrieve_retry_interval = '500ms'" "keypal.flush_interval = 200" \
        "keypal.primary_conninfo = 'host=$PGHOST port=$PGPORT user=keypal_ship'"
done
replayed() { wait_replay "$S1" "$P1" "$S2" "$P2"; }  # both standbys replayed the primary's WAL so far
is "$(s1 -c "SELECT pg_is_in_recovery()") $(s2 -c "SELECT pg_is_in_recovery()")" "t t" "two streaming standbys"

# Shared limits: 30 an hour, split 3 ways: 10 each (the primary 30 - 2 x 10).
pq -c "SELECT keypal_configure(limit_split => 3)" >/dev/null
read -r rid rkey < <(pq -F ' ' -c "SELECT id, key FROM keypal_create(owner_id => 'rep', rate_limit => '{\"requests\": 30, \"window\": \"1h\"}')")
qkey=$(pq -c "SELECT key FROM keypal_create(owner_id => 'rep', quota => '{\"limit\": 7, \"period\": \"day\"}')")
replayed
is "$(s1 -c "SELECT keypal_configure()->>'limit_split'")" 3 "the setting reaches the standbys with the rest of the settings"
hammer() {  # hammer SERVER KEY N: N verifies, one per statement; prints how many were valid
    local f=$1 key=$2 n=$3
    for _ in $(seq "$n"); do echo "SELECT (keypal_verify('$key')).valid;"; done | "$f" | grep -c '^t$' || true
}
work=$(mktemp -d)
for f in pq s1 s2; do hammer "$f" "$rkey" 25 >"$work/$f" & done
wait
got="$(cat "$work/pq") $(cat "$work/s1") $(cat "$work/s2")"
is "$got" "10 10 10" "one key verified 25 times through each of the three at once: each admits its share, 10"
is "$(( $(cat "$work/pq") + $(cat "$work/s1") + $(cat "$work/s2") ))" 30 "30 in all: exactly the limit, never more"
is "$(s1 -c "SELECT (keypal_verify('$rkey')).error_code")" RATE_LIMITED "a standby past its share refuses"
is "$(hammer pq "$qkey" 7) $(hammer s1 "$qkey" 7) $(hammer s2 "$qkey" 7)" "3 2 2" \
   "a quota of 7 a day split 3 ways: the primary 3, each standby 2 (its own count, not the primary's it replays)"
# A standby's count is in its shared memory only: an idle entry is not dropped (past the
# worker's idle time, 10 s at this flush interval, and its sweep, every 5 s), or the next
# verify would count afresh.
sleep 17
is "$(s1 -c "SELECT value FROM keypal_stats() WHERE name = 'flush_workers'")" 1 \
   "the standby runs its flush worker (reading only: it died at its first flush before 0.4.0)"
is "$(s1 -c "SELECT (keypal_verify('$qkey')).error_code")" QUOTA_EXCEEDED \
   "idle for longer than the worker keeps an entry, a standby still counts its quota use"

# Global limits: every server decides on the key's count over all three.
pq -c "SELECT keypal_configure(limit_split => 1)" >/dev/null
is "$(pq -F ' ' -c "SELECT has_function_privilege('keypal_ship', 'keypal.replica_counts(text, bigint, text)', 'EXECUTE'),
                    has_function_privilege('public', 'keypal.replica_counts(text, bigint, text)', 'EXECUTE'),
                    has_table_privilege('keypal_ship', 'keypal.keys', 'SELECT')")" \
   "t f f" "the shipping role may call keypal.replica_counts (and read no key); PUBLIC may not"
read -r gid gkey < <(pq -F ' ' -c "SELECT id, key FROM keypal_create(owner_id => 'rep', rate_limit => '{\"requests\": 30, \"window\": \"1h\"}', quota => '{\"limit\": 1000, \"period\": \"day\"}')")
replayed
is "$(hammer s1 "$gkey" 10)" 10 "a standby admits 10 of a key limited to 30 an hour"
start=$(date +%s%N)
is "$(poll 100 "10 t" pq -F ' ' -c "SELECT (SELECT used FROM keypal.quota_usage WHERE key_id = '$gid'),
                                          (SELECT last_used_at IS NOT NULL FROM keypal.key_usage WHERE key_id = '$gid')")" "10 t" \
   "the standby's quota use and last use reach the primary's tables"
took=$(( ($(date +%s%N) - start) / 1000000 ))
ok "$( [ "$took" -le 2000 ]; echo $?)" "within two flush intervals (200 ms each, on the standby then the primary; took $took ms, allowed 2 s with scheduling)"
# (Both standbys' workers running, so a first verify's question is answered at once.)
wkey=$(pq -c "SELECT key FROM keypal_create(owner_id => 'rep', rate_limit => '{\"requests\": 1000, \"window\": \"1h\"}')")
replayed
s1 -c "SELECT (keypal_verify('$wkey')).valid" >/dev/null
s2 -c "SELECT (keypal_verify('$wkey')).valid" >/dev/null
workers() { echo "$(s1 -c "SELECT value FROM keypal_stats() WHERE name = 'flush_workers'") $(s2 -c "SELECT value FROM keypal_stats() WHERE name = 'flush_workers'")"; }
poll 100 "1 1" workers >/dev/null
is "$(hammer s2 "$gkey" 25)" 20 "the other standby, verifying the key for the first time, admits only the 20 left (it asks for the key's global count before deciding)"
poll 100 30 pq -c "SELECT used FROM keypal.quota_usage WHERE key_id = '$gid'" >/dev/null
is "$(hammer pq "$gkey" 5)" 0 "the primary, with 30 admitted on the standbys, admits none"
is "$(s1 -c "SELECT (keypal_verify('$gkey')).error_code")" RATE_LIMITED "nor the first standby"
# Three servers at once, each client pacing one verify per 50 ms (4 per 200 ms interval): a
# server learns of the others' admissions at most two intervals late, so the three admit at
# most the limit plus what the other two admitted within two intervals, each (3 x 2 x 8 = 48).
read -r bid bkey < <(pq -F ' ' -c "SELECT id, key FROM keypal_create(owner_id => 'rep', rate_limit => '{\"requests\": 30, \"window\": \"1h\"}')")
replayed
paced() {  # paced SERVER KEY N: N verifies 50 ms apart; prints how many were valid
    local f=$1 key=$2 n=$3
    for _ in $(seq "$n"); do echo "SELECT (keypal_verify('$key')).valid; SELECT pg_sleep(0.05);"; done | "$f" | grep -c '^t$' || true
}
for f in pq s1 s2; do paced "$f" "$bkey" 40 >"$work/$f" & done
wait
total=$(( $(cat "$work/pq") + $(cat "$work/s1") + $(cat "$work/s2") ))
most=$(sort -n "$work/pq" "$work/s1" "$work/s2" | tail -1)
ok "$( [ "$most" -lt 30 ]; echo $?)" "each server admits less than the limit (the most: $most): each hears of the others' admissions"
ok "$( [ "$total" -ge 30 ] && [ "$total" -le 78 ]; echo $?)" \
   "three servers verifying one key at once (40 each, 50 ms apart) admit $total ($(cat "$work/pq") + $(cat "$work/s1") + $(cat "$work/s2")): at least the limit, 30, and within the bound, 30 + 48"
echo "# over-admission with global limits: $((total - 30)) over a limit of 30"

# Two databases on one server: each standby worker ships to its own database on the primary,
# even for a key both databases hold (a copy restored under the same id).
DB2=${DB}2
q -d postgres -c "DROP DATABASE IF EXISTS $DB2 WITH (FORCE)" -c "CREATE DATABASE $DB2" >/dev/null 2>&1
q -d $DB2 -c "CREATE EXTENSION keypal" \
  -c "GRANT EXECUTE ON FUNCTION keypal.replica_counts(text, bigint, text) TO keypal_ship" >/dev/null
read -r did dkey < <(pq -F ' ' -c "SELECT id, key FROM keypal_create(owner_id => 'twin', quota => '{\"limit\": 1000, \"period\": \"day\"}')")
twin=$(pq -c "SELECT keypal_export(owner_id => 'twin')")
echo "SELECT imported FROM keypal_import(:'data'::jsonb);" | q -d $DB2 -v data="$twin" >/dev/null
replayed
s1db2() { psql -X -q -At -v ON_ERROR_STOP=1 -h "$S1" -p "$P1" -d $DB2 "$@"; }
is "$(for _ in 1 2 3; do echo "SELECT (keypal_verify('$dkey')).valid;"; done | s1db2 | grep -c '^t$')" 3 \
   "a standby verifies a key in a second database (a copy of one in the first, same id)"
is "$(hammer s1 "$dkey" 2)" 2 "and the same key twice in the first database"
twin_used() { echo "$(q -d $DB2 -c "SELECT used FROM keypal.quota_usage WHERE key_id = '$did'") $(pq -c "SELECT used FROM keypal.quota_usage WHERE key_id = '$did'")"; }
is "$(poll 100 "3 2" twin_used)" "3 2" \
   "each database on the primary counts its own: 3 in the second, 2 in the first"
q -d postgres -c "DROP DATABASE $DB2 WITH (FORCE)" >/dev/null

# A primary that refuses batches for longer than ten flush intervals (the grant taken away)
# does not get them again and again: they are given up (a batch held forever would pin its
# entries in the standby's memory), and the batches after go through once the grant is back.
pq -c "REVOKE EXECUTE ON FUNCTION keypal.replica_counts(text, bigint, text) FROM keypal_ship" >/dev/null
read -r xid xkey < <(pq -F ' ' -c "SELECT id, key FROM keypal_create(owner_id => 'rep', quota => '{\"limit\": 1000, \"period\": \"day\"}')")
replayed
is "$(hammer s1 "$xkey" 3)" 3 "a standby verifies a key while the primary refuses its batches"
sleep 3   # past the give-up time: ten flush intervals, 2 s at least
is "$(s1 -c "SELECT value FROM keypal_stats() WHERE name = 'ship_failing'")" 1 "keypal_stats on the standby says its worker cannot ship"
pq -c "GRANT EXECUTE ON FUNCTION keypal.replica_counts(text, bigint, text) TO keypal_ship" >/dev/null
is "$(hammer s1 "$xkey" 2)" 2 "and after the grant is back"
is "$(poll 100 2 pq -c "SELECT used FROM keypal.quota_usage WHERE key_id = '$xid'")" 2 \
   "the batches after the grant reach the primary (2); the refused one was given up, not sent again"
is "$(s1 -c "SELECT value FROM keypal_stats() WHERE name = 'ship_failing'") $(pq -c "SELECT value IS NULL FROM keypal_stats() WHERE name = 'ship_failing'")" "0 t" \
   "then it says it ships again (and on the primary, ship_failing is NULL)"

# Revocation: as fast as replay.
read -r vid vkey < <(pq -F ' ' -c "SELECT id, key FROM keypal_create(owner_id => 'rep')")
replayed
is "$(s1 -c "SELECT (keypal_verify('$vkey')).valid") $(s2 -c "SELECT (keypal_verify('$vkey')).valid")" "t t" "a new key verifies on both standbys"
# A standby session in an older REPEATABLE READ, READ ONLY transaction, open across the
# revoke, answers REVOKED once the standby replayed it.
rm -f "$work/go"
{ echo "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY;"
  echo "SELECT coalesce((keypal_verify('$vkey')).error_code, 'VALID');"
  poll 100 yes sh -c "[ -e '$work/go' ] && echo yes || true" >/dev/null
  echo "SELECT coalesce((keypal_verify('$vkey')).error_code, 'VALID');"
  echo "COMMIT;"; } | PGAPPNAME=older s1 >"$work/older" &
poll 100 "idle in transaction" s1 -c "SELECT state FROM pg_stat_activity WHERE application_name = 'older'" >/dev/null
pq -c "SELECT keypal_revoke('$vid')" >/dev/null
replayed
touch "$work/go"
wait
is "$(tr '\n' ' ' <"$work/older")" "VALID REVOKED " \
   "a standby transaction (REPEATABLE READ, READ ONLY) begun before the revoke answers REVOKED once it is replayed"
is "$(poll 100 REVOKED s1 -c "SELECT (keypal_verify('$vkey')).error_code") $(poll 100 REVOKED s2 -c "SELECT (keypal_verify('$vkey')).error_code")" \
   "REVOKED REVOKED" "revoked on the primary: REVOKED on both standbys within 10 s (as soon as they replay it)"

# Cut off: the primary stops; the standbys keep verifying what they have.
read -r cid ckey < <(pq -F ' ' -c "SELECT id, key FROM keypal_create(owner_id => 'rep')")
replayed
as_pg "$PGBIN/pg_ctl" -D "$PGHOST" -m fast -w stop >/dev/null
is "$(s1 -c "SELECT coalesce((keypal_verify('$ckey')).error_code, 'VALID')") $(s1 -c "SELECT (keypal_verify('$vkey')).error_code")" \
   "VALID REVOKED" "with the primary down, a standby still verifies: valid keys valid, revoked ones revoked"
is "$(s2 -c "SELECT count(*) FROM generate_series(1, 50) i, keypal_verify('$ckey') v WHERE v.valid")" 50 \
   "and keeps answering (50 verifies on the other standby)"
is "$(hammer s2 "$gkey" 3)" 0 "a standby cut off still refuses a key the others used up (the global count it last heard)"
as_pg "$PGBIN/pg_ctl" -D "$PGHOST" -l "$PGHOST/server.log" -w start >/dev/null
is "$(poll 100 t pq -c "SELECT last_used_at > now() - interval '1 minute' FROM keypal.key_usage WHERE key_id = '$cid'")" t \
   "once the primary is back, the counts the standby made meanwhile reach it (the key's last use)"
pq -c "SELECT keypal_revoke('$cid')" >/dev/null
is "$(poll 300 REVOKED s1 -c "SELECT (keypal_verify('$ckey')).error_code") $(poll 300 REVOKED s2 -c "SELECT (keypal_verify('$ckey')).error_code")" \
   "REVOKED REVOKED" "once the primary is back, both standbys reconnect and replay a revoke made after"
rm -rf "$work"
done_testing
