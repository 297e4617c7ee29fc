# TAP helpers for the multi-session tests. Each *.t sources this file; prove runs them
# against the cluster scripts/test.sh started (PGHOST/PGPORT/PGUSER set, database keypal_test).
set -euo pipefail
export PGDATABASE=${PGDATABASE:-keypal_test}
TAP_N=0
TAP_FAILED=0

q() { psql -X -q -At -v ON_ERROR_STOP=1 "$@"; }

ok() {   # ok CONDITION-EXIT-CODE DESCRIPTION  (use: ok "$( [ a = b ]; echo $? )" "desc")
    TAP_N=$((TAP_N + 1))
    if [ "$1" = 0 ]; then echo "ok $TAP_N - $2"; else echo "not ok $TAP_N - $2"; TAP_FAILED=$((TAP_FAILED + 1)); fi
}

is() {   # is GOT WANT DESCRIPTION
    TAP_N=$((TAP_N + 1))
    if [ "$1" = "$2" ]; then
        echo "ok $TAP_N - $3"
    else
        echo "not ok $TAP_N - $3"
        echo "#   got:  '$1'"
        echo "#   want: '$2'"
        TAP_FAILED=$((TAP_FAILED + 1))
    fi
}

done_testing() {
    echo "1..$TAP_N"
    [ "$TAP_FAILED" = 0 ]
}

poll() {  # poll TRIES WANT CMD...: runs CMD every 0.1 s, at most TRIES times, until it prints WANT; prints its last answer
    local tries=$1 want=$2 got=""
    shift 2
    for _ in $(seq "$tries"); do
        got=$("$@")
        [ "$got" = "$want" ] && break
        sleep 0.1
    done
    echo "$got"
}

wait_for() {  # wait_for SQL WANT: polls (up to 15 s) until SQL returns WANT; prints the last answer
    poll 150 "$2" q -c "$1"
}

PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
CLUSTER="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/scripts/cluster.sh"
wait_replay() {  # wait_replay DIR PORT ...: until (at most 15 s each) every standby named by its socket directory and port replayed the primary's WAL so far
    local lsn
    lsn=$(q -c "SELECT pg_current_wal_lsn()")
    while [ $# -ge 2 ]; do
        poll 150 t psql -X -q -At -h "$1" -p "$2" -d postgres -c "SELECT pg_last_wal_replay_lsn() >= '$lsn'" >/dev/null
        shift 2
    done
}
restart() {  # restart [-m MODE]: stops (fast unless told) and starts the test cluster
    local mode=${1:-fast}
    as_pg "$PGBIN/pg_ctl" -D "$PGHOST" -m "$mode" -w stop >/dev/null
    as_pg "$PGBIN/pg_ctl" -D "$PGHOST" -l "$PGHOST/server.log" -w start >/dev/null
}

# Two sessions racing for a lock (for tests that set $work, a scratch directory).
state_of() {  # state_of APPNAME: the session's state, or "Lock" while it waits on one
    q -c "SELECT CASE WHEN wait_event_type = 'Lock' THEN 'Lock' ELSE state END
            FROM pg_stat_activity WHERE application_name = '$1'"
}
# hold APPNAME SQL [BEGIN]: runs SQL in a transaction that stays open until session "second"
# waits on a lock (at most 10 s), then commits; prints "Lock" to $work/waited if it did.
hold() {
    { echo "${3:-BEGIN}; $2"
      poll 100 Lock state_of second >"$work/waited"
      echo "COMMIT;"; } | PGAPPNAME=$1 q >/dev/null &
    poll 100 "idle in transaction" state_of "$1" >/dev/null
}
# second SQL: runs SQL as session "second"; prints its output, or its SQLSTATE and message.
second() {
    { PGAPPNAME=second q -c "\set VERBOSITY verbose" -c "\set SHOW_CONTEXT never" -c "$1" 2>&1 || true; } |
        sed '/^\(DETAIL\|HINT\|LOCATION\):/d; s/^ERROR:  \([0-9A-Z]*\): \([^:]*\):.*/\1 \2/'
}
