#!/usr/bin/env bash
# Verify reads the latest committed state of a key and its ancestors, at the current time,
# whatever the caller's transaction: a revoke, disable or parent's disable that another
# session committed is seen inside an older READ COMMITTED, REPEATABLE READ, SERIALIZABLE
# or READ ONLY transaction, and by a single long statement verifying in a loop.
source "$(dirname "$0")/lib.sh"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# older LEVEL CHANGE-SQL EXPR: opens a transaction at LEVEL that has taken its snapshot,
# lets another session run CHANGE-SQL and commit, then evaluates EXPR inside the old
# transaction and prints it.
older() {
    local level=$1 change=$2 expr=$3
    rm -f "$work/in"; mkfifo "$work/in"
    q < "$work/in" > "$work/out" 2>&1 &
    local reader=$!
    exec 3> "$work/in"
    echo "BEGIN ISOLATION LEVEL $level; SELECT count(*) FROM keypal.keys;" >&3
    sleep 0.3
    q -c "$change" >/dev/null
    echo "SELECT 'verdict:' || ($expr);" >&3
    echo "COMMIT;" >&3
    exec 3>&-
    wait "$reader"
    sed -n 's/^verdict://p' "$work/out"
}
# verdict KEY: the expression for KEY's verify verdict (VALID or the error code).
verdict() { echo "SELECT coalesce(error_code, 'VALID') FROM keypal_verify('$1')"; }

new_key() { q -F ' ' -c "SELECT id, key FROM keypal_create(owner_id => 'tb', scopes => '{read}' $1)"; }

for level in "READ COMMITTED" "REPEATABLE READ" "SERIALIZABLE" "REPEATABLE READ READ ONLY"; do
    read -r id key < <(new_key "")
    is "$(older "$level" "SELECT keypal_revoke('$id')" "$(verdict "$key")")" REVOKED "$level: a revoke committed meanwhile is seen"
    read -r id key < <(new_key "")
    is "$(older "$level" "SELECT keypal_disable('$id')" "$(verdict "$key")")" DISABLED "$level: a disable committed meanwhile is seen"
    read -r id key < <(new_key "")
    q -c "SELECT keypal_disable('$id')" >/dev/null
    is "$(older "$level" "SELECT keypal_enable('$id')" "$(verdict "$key")")" VALID "$level: an enable committed meanwhile is seen"
    read -r pid pkey < <(new_key "")
    read -r cid ckey < <(new_key ", parent_id => '$pid'")
    is "$(older "$level" "SELECT keypal_disable('$pid')" "$(verdict "$ckey")")" DISABLED "$level: a parent's disable committed meanwhile is seen"
done

# keypal_has_scope reads as verify does: scopes narrowed or a key revoked meanwhile.
read -r id key < <(new_key "")
q -c "SELECT keypal_update('$id', scopes => '{read,write}')" >/dev/null
is "$(older "REPEATABLE READ" "SELECT keypal_update('$id', scopes => '{read}')" "keypal_has_scope('$id', 'write')")" false \
   "REPEATABLE READ: has_scope sees scopes narrowed meanwhile"
is "$(older "REPEATABLE READ" "SELECT keypal_revoke('$id')" "keypal_has_scope('$id', 'read')")" false \
   "REPEATABLE READ: has_scope sees a revoke committed meanwhile"

# A change not yet committed is not seen by others; the changing transaction sees its own.
read -r id key < <(new_key "")
got=$(q -c "BEGIN" -c "SELECT keypal_revoke('$id')" -c "SELECT coalesce(error_code, 'VALID') FROM keypal_verify('$key')" -c "ROLLBACK")
is "$(echo "$got" | tail -1)" REVOKED "the revoking transaction sees its own revoke"
is "$(q -c "SELECT coalesce(error_code, 'VALID') FROM keypal_verify('$key')")" VALID "a rolled-back revoke never counted"

# One long statement (inside REPEATABLE READ) verifying every 20 ms while another session
# revokes: the verdicts flip from VALID to REVOKED mid-statement, and never back.
read -r id key < <(new_key "")
( q -c "BEGIN ISOLATION LEVEL REPEATABLE READ" \
    -c "SELECT string_agg(coalesce(v.error_code, 'VALID'), ' ' ORDER BY g)
          FROM generate_series(1, 150) g
         CROSS JOIN LATERAL (SELECT pg_sleep(0.02) WHERE g > 0) s
         CROSS JOIN LATERAL keypal_verify(CASE WHEN g > 0 THEN '$key' END) v" \
    -c "COMMIT" > "$work/loop" ) &
looper=$!
# Revoke once the statement has been verifying for a while (however slow it was to start).
for _ in $(seq 100); do
    [ "$(q -c "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE '%generate_series(1, 150)%' AND pid <> pg_backend_pid()")" = 1 ] && break
    sleep 0.05
done
sleep 0.8
q -c "SELECT keypal_revoke('$id')" >/dev/null
wait "$looper"
verdicts=$(head -1 "$work/loop")
first=$(echo "$verdicts" | awk '{print $1}')
last=$(echo "$verdicts" | awk '{print $NF}')
flips=$(echo "$verdicts" | tr ' ' '\n' | uniq | wc -l)
is "$first" VALID "long statement: valid before the revoke"
is "$last" REVOKED "long statement: revoked after it committed, within the same statement"
is "$flips" 2 "long statement: one flip, never back"

done_testing
