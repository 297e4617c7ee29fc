#!/usr/bin/env bash
# Two keypal_configure calls at once: the second waits for the first, then applies its own
# argument on top of what the first committed — it never writes back a copy of the settings
# read before the first committed (which undid the first's change, and with it the record of
# the key shape the first made keys in: verify then refused those keys unlooked).
source "$(dirname "$0")/lib.sh"

work=$(mktemp -d)
chmod 755 "$work"
db=keypal_configure_race
trap 'rm -rf "$work"; q -d postgres -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true' EXIT
q -d postgres -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db" >/dev/null 2>&1
export PGDATABASE=$db
q -c "CREATE EXTENSION keypal" >/dev/null

# The first makes keys 38 characters long and one of them, and holds its transaction open
# until the second (turning checksums on) waits on it.
hold first "SELECT keypal_configure(length => 38);
\\o $work/key
SELECT key FROM keypal_create(owner_id => 'configure_race');
\\o"
got=$(second "SELECT keypal_configure(checksum => true)->>'length'")
wait
is "$(cat "$work/waited")" Lock "a second keypal_configure waits for the first's transaction"
is "$got" 38 "then reads the settings the first committed"
is "$(q -c "SELECT (keypal_configure()->>'length') || ' ' || (keypal_configure()->>'checksum')")" "38 true" \
   "and both changes stand: the first's length, the second's checksum"
is "$(q -c "SELECT coalesce(error_code, 'VALID') FROM keypal_verify('$(cat "$work/key")')")" VALID \
   "a key made under the first's settings still verifies"

# Two at once in REPEATABLE READ: the second's snapshot predates the first's commit, so it
# fails with 40001 rather than write over it.
hold first "SELECT keypal_configure(length => 40);"
got=$(second "BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT 1; SELECT keypal_configure(checksum => false)->>'length'; COMMIT;")
wait
ok "$(echo "$got" | grep -q '^ERROR:  40001'; echo $?)" "in REPEATABLE READ, the second fails with 40001"
is "$(q -c "SELECT (keypal_configure()->>'length') || ' ' || (keypal_configure()->>'checksum')")" "40 true" \
   "and the first's change stands"
done_testing
