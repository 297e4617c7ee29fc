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

# An import notes imported keys in the settings under the same lock: a second import waits
# for the first's transaction there, and the first may still configure after it (0.9.0's
# first version had the second hold the table while it waited on the row: a deadlock).
rec() { echo "[{\"id\": \"$1\", \"key_hash\": \"$2\", \"owner_id\": \"configure_race\"}]"; }
{ echo "BEGIN; SELECT imported FROM keypal_import('$(rec 00000000-0000-4000-8000-0000000000a1 ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb)');"
  poll 100 Lock state_of second >"$work/waited"
  echo "SELECT keypal_configure(prefix => 'cr_') IS NOT NULL;"
  echo "COMMIT;"; } | PGAPPNAME=first q >"$work/first.out" 2>&1 &
poll 100 "idle in transaction" state_of first >/dev/null
got=$(second "SELECT imported FROM keypal_import('$(rec 00000000-0000-4000-8000-0000000000b1 3e23e8160039594a33894f6564e1b1348bbd7a0088d42c4acb73eeaed59c009d)')")
wait
is "$(cat "$work/waited")" Lock "a second import waits for the first's transaction"
is "$(echo $(cat "$work/first.out"))" "1 t" "which configures meanwhile, without a deadlock"
is "$got" 1 "then the second imports its key"
is "$(q -c "SELECT keypal_configure()->>'prefix'")" cr_ "(the configure stands)"
done_testing
