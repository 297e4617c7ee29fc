#!/usr/bin/env bash
# A child key made while its parent is revoked or rotated by another session is never missed
# (DESIGN.md, "An UPDATE only where there is a row to change"): making a child locks its
# parent FOR SHARE, which waits for the revoking or rotating transaction's lock on it, and the
# revoke or rotation waits for the child's transaction; whichever commits first, the child
# ends up refused, revoked, or moved to the new key.
source "$(dirname "$0")/lib.sh"

work=$(mktemp -d)
chmod 755 "$work"
trap 'rm -rf "$work"' EXIT

parent() { q -c "SELECT id FROM keypal_create(owner_id => 'child_race', scopes => '{read}')"; }
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
verify_child() {  # verify_child PARENT: how many children the parent has, and how the one whose key is in $work/child verifies
    q -c "SELECT (SELECT count(*) FROM keypal.keys WHERE parent_id = '$1') || ' ' || coalesce(error_code, 'VALID')
            FROM keypal_verify('$(cat "$work/child")')"
}

# 1. The revoke first: the child's maker waits for it, then finds its parent revoked.
p=$(parent)
hold revoker "SELECT keypal_revoke('$p');"
got=$(second "SELECT id FROM keypal_create(owner_id => 'child_race', parent_id => '$p', scopes => '{read}')")
wait
is "$(cat "$work/waited")" Lock "a child's maker waits for the uncommitted revoke of its parent"
is "$got" "55000 CANNOT_MODIFY_REVOKED" "then refuses: the parent is revoked (55000)"
is "$(q -c "SELECT count(*) FROM keypal.keys WHERE parent_id = '$p'")" 0 "and makes no child"

# 2. The child first (READ COMMITTED): the revoke waits for it, then cascades to it.
p=$(parent)
hold maker "\\o $work/child
SELECT key FROM keypal_create(owner_id => 'child_race', parent_id => '$p', scopes => '{read}');
\\o"
got=$(second "SELECT keypal_revoke('$p')")
wait
is "$(cat "$work/waited")" Lock "a revoke waits for the uncommitted child of its key"
is "$got" 1 "then revokes the parent"
is "$(verify_child "$p")" "1 REVOKED" "and the child it waited for is refused"
is "$(q -c "SELECT revoke_reason FROM keypal.keys WHERE parent_id = '$p' AND revoked_at <= now()")" \
   "parent revoked" "revoked by the cascade, with its reason"

# 3. The child first, the revoke in REPEATABLE READ with a snapshot from before the child's
# commit: its cascade cannot see the child, but verify refuses the child by its revoked parent.
p=$(parent)
hold maker "\\o $work/child
SELECT key FROM keypal_create(owner_id => 'child_race', parent_id => '$p', scopes => '{read}');
\\o"
got=$(second "BEGIN ISOLATION LEVEL REPEATABLE READ;
SELECT count(*) FROM keypal.keys WHERE parent_id = '$p';
SELECT keypal_revoke('$p');
COMMIT;")
wait
is "$(cat "$work/waited")" Lock "a REPEATABLE READ revoke waits for the uncommitted child too"
is "$(echo $got)" "0 1" "its snapshot saw no child; it revoked the parent"
is "$(verify_child "$p")" "1 REVOKED" "the child it could not see is refused all the same"
is "$(q -c "SELECT revoked_at IS NULL FROM keypal.keys WHERE parent_id = '$p'")" t \
   "(its own row is not marked: the REPEATABLE READ cascade missed it, as DESIGN.md says)"

# 4. The child first, then a rotation of its parent: the rotation waits, then moves it to the
# new key.
p=$(parent)
hold maker "\\o $work/child
SELECT key FROM keypal_create(owner_id => 'child_race', parent_id => '$p', scopes => '{read}');
\\o"
got=$(second "SELECT id FROM keypal_rotate('$p')")
wait
is "$(cat "$work/waited")" Lock "a rotation waits for the uncommitted child of its key"
is "$(q -c "SELECT count(*) FILTER (WHERE parent_id = '$p') || ' ' || count(*) FILTER (WHERE parent_id = '$got')
              FROM keypal.keys")" "0 1" "then moves the child it waited for to the new key"
is "$(q -c "SELECT coalesce(error_code, 'VALID') FROM keypal_verify('$(cat "$work/child")')")" VALID \
   "which keeps it valid under its new parent"

# 5. The rotation first: the child's maker waits, then finds its parent revoked (no grace).
p=$(parent)
hold rotator "SELECT id FROM keypal_rotate('$p');"
got=$(second "SELECT id FROM keypal_create(owner_id => 'child_race', parent_id => '$p', scopes => '{read}')")
wait
is "$(cat "$work/waited")" Lock "a child's maker waits for the uncommitted rotation of its parent"
is "$got" "55000 CANNOT_MODIFY_REVOKED" "then refuses: the rotated parent is revoked"

q -c "DELETE FROM keypal.keys k WHERE owner_id = 'child_race' AND parent_id IS NOT NULL;
      DELETE FROM keypal.keys k WHERE owner_id = 'child_race' AND parent_id IS NULL" >/dev/null
done_testing
