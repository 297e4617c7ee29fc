#!/usr/bin/env bash
# Two sessions: one verifies in a loop while the other revokes and commits.
# Not one verify that starts after the revoke's COMMIT returned may succeed.
source "$(dirname "$0")/lib.sh"

id_key=$(q -c "SELECT id || ' ' || key FROM keypal_create(owner_id => 'race', scopes => '{read}')")
id=${id_key%% *}
key=${id_key#* }
q -c "CREATE TABLE IF NOT EXISTS race_log (at timestamptz, valid boolean, code text); TRUNCATE race_log;
      CREATE TABLE IF NOT EXISTS race_commit (at timestamptz); TRUNCATE race_commit;"

# Session B: 4 seconds of verifies, each logged with the time it started. The log rows are
# written with dblink-free autonomy: one statement per verify, autocommit.
(
    end=$(( $(date +%s) + 4 ))
    while [ "$(date +%s)" -lt "$end" ]; do
        echo "INSERT INTO race_log SELECT clock_timestamp(), v.valid, v.error_code FROM keypal_verify('$key', 'read') v;"
    done | q >/dev/null
) &
verifier=$!

sleep 1.5
# Session A: revoke and commit; record when COMMIT has returned.
q -c "BEGIN; SELECT keypal_revoke('$id', reason => 'race'); COMMIT;" >/dev/null
q -c "INSERT INTO race_commit VALUES (clock_timestamp())"
wait "$verifier"

before=$(q -c "SELECT count(*) FROM race_log WHERE valid")
after_ok=$(q -c "SELECT count(*) FROM race_log l, race_commit c WHERE l.at > c.at AND l.valid")
after_revoked=$(q -c "SELECT count(*) FROM race_log l, race_commit c WHERE l.at > c.at AND l.code = 'REVOKED'")
flips=$(q -c "SELECT count(*) FROM (SELECT valid, lag(valid) OVER (ORDER BY at) AS prev FROM race_log) t WHERE valid AND prev = false")
others=$(q -c "SELECT count(*) FROM race_log WHERE NOT valid AND code IS DISTINCT FROM 'REVOKED'")

ok "$( [ "$before" -gt 10 ]; echo $? )" "the key verified before the revoke ($before times)"
ok "$( [ "$after_revoked" -gt 10 ]; echo $? )" "verifies after the commit answered REVOKED ($after_revoked times)"
is "$after_ok" 0 "not one success after the revoke committed"
is "$flips" 0 "once revoked, never valid again"
is "$others" 0 "no other answer while the revoke commits (one version of the row is always seen)"
q -c "DROP TABLE race_log, race_commit"
done_testing
