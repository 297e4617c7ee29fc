#!/usr/bin/env bash
# Beyond one server: a primary and two streaming standbys on this machine (pg_basebackup).
#   - keypal_configure(limit_split => 3): one limited key verified through all three at once
#     is admitted exactly its limit in all, each server at most its share;
#   - a revoke on the primary is REVOKED on both standbys as soon as they replay it;
#   - a standby cut off from its primary keeps verifying, and catches up when it is back.
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
    q -d postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
}
trap cleanup EXIT

q -d postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB" >/dev/null 2>&1
pq -c "CREATE EXTENSION keypal" >/dev/null
for s in "$S1:$P1" "$S2:$P2"; do
    bash "$CLUSTER" standby "${s%:*}" "${s#*:}" "$PGHOST" "$PGPORT" \
        "wal_retrieve_retry_interval = '500ms'" "keypal.flush_interval = 200"
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
as_pg "$PGBIN/pg_ctl" -D "$PGHOST" -l "$PGHOST/server.log" -w start >/dev/null
pq -c "SELECT keypal_revoke('$cid')" >/dev/null
is "$(poll 300 REVOKED s1 -c "SELECT (keypal_verify('$ckey')).error_code") $(poll 300 REVOKED s2 -c "SELECT (keypal_verify('$ckey')).error_code")" \
   "REVOKED REVOKED" "once the primary is back, both standbys reconnect and replay a revoke made after"
rm -rf "$work"
done_testing
