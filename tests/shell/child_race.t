#!/usr/bin/env bash
# A child key made while its parent is revoked, rotated or narrowed by another session is
# never missed (DESIGN.md, "An UPDATE only where there is a row to change"): making a child
# locks its parent FOR SHARE, which waits for the revoking or rotating transaction's lock on
# it, and the revoke or rotation waits for the child's transaction; whichever commits first,
# the child ends up refused, revoked, or moved to the new key — or, in REPEATABLE READ or
# SERIALIZABLE, the change of the parent fails with 40001, to be run again.
source "$(dirname "$0")/lib.sh"

work=$(mktemp -d)
chmod 755 "$work"
trap 'rm -rf "$work"' EXIT

parent() { q -c "SELECT id FROM keypal_create(owner_id => 'child_race', scopes => '{read}')"; }
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

# 3. The child first, then a revoke, an update narrowing the scopes, or a rotation of its
# parent in REPEATABLE READ, with a snapshot from before the child's commit: each waits, then
# fails with 40001 rather than miss the child (keypal.refuse_unseen_children); run again, it
# sees the child.
# unseen LEVEL SQL WHAT: a new parent ($p), its child made and held uncommitted (its key in
# $work/child), while session "second" runs SQL at LEVEL after a snapshot without the child;
# checks it waits, then fails with 40001.
unseen() {
    p=$(parent)
    hold maker "\\o $work/child
SELECT key FROM keypal_create(owner_id => 'child_race', parent_id => '$p', scopes => '{read}');
\\o"
    got=$(second "BEGIN ISOLATION LEVEL $1;
SELECT count(*) FROM keypal.keys WHERE parent_id = '$p';
${2//@p/$p};
COMMIT;")
    wait
    is "$(cat "$work/waited")" Lock "a $1 $3 waits for the uncommitted child"
    is "$(echo $got)" "0 40001 could not serialize access" "then fails with 40001: its snapshot does not show the child"
}
unseen "REPEATABLE READ" "SELECT keypal_revoke('@p')" revoke
is "$(q -c "SELECT revoked_at IS NULL FROM keypal.keys WHERE id = '$p'")" t "and revokes nothing"
is "$(verify_child "$p")" "1 VALID" "(the child is valid: its parent is)"
is "$(q -c "BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT keypal_revoke('$p'); COMMIT")" 1 "run again, it revokes the parent"
is "$(verify_child "$p")" "1 REVOKED" "and the child is refused"
is "$(q -c "SELECT revoke_reason FROM keypal.keys WHERE parent_id = '$p' AND revoked_at <= now()")" \
   "parent revoked" "its row marked by the cascade"

narrow="SELECT name FROM keypal_update('@p', scopes => '{write}')"
unseen "REPEATABLE READ" "$narrow" "update of the parent's scopes"
is "$(echo $(second "${narrow//@p/$p}"))" "22023 invalid scopes" "run again, it refuses scopes the child holds more of"

unseen SERIALIZABLE "SELECT count(*) FROM keypal_rotate('@p')" rotation
got=$(second "BEGIN ISOLATION LEVEL SERIALIZABLE; SELECT id FROM keypal_rotate('$p'); COMMIT;")
is "$(q -c "SELECT count(*) FROM keypal.keys WHERE parent_id = '$got'")" 1 "run again, it moves the child to the new key"

overwrite="SELECT overwritten FROM keypal_import(jsonb_build_array((SELECT r || '{\"scopes\": [\"write\"]}'
             FROM keypal_export_records('child_race') r WHERE r->>'id' = '@p')), on_conflict => 'overwrite')"
unseen "REPEATABLE READ" "$overwrite" "import overwriting the parent"
is "$(echo $(second "${overwrite//@p/$p}"))" "22023 invalid data[0].scopes" "run again, it refuses scopes the child holds more of"

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
