#!/usr/bin/env bash
# Export / import between databases (SPEC §3): keys of every kind exported from one
# database and imported into another verify identically there (valid, or the same error
# code, for the same requests); signing keys keep their signing secret; the TypeScript
# keypal's records, written by running JavaScript, import and verify with their plaintext.
source "$(dirname "$0")/lib.sh"

src=keypal_xfer_src
dst=keypal_xfer_dst
work=$(mktemp -d)
chmod 755 "$work"
cleanup() {
    rm -rf "$work"
    q -d postgres -c "DROP DATABASE IF EXISTS $src WITH (FORCE)" -c "DROP DATABASE IF EXISTS $dst WITH (FORCE)" >/dev/null 2>&1 || true
}
trap cleanup EXIT
for db in $src $dst; do
    q -d postgres -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db" >/dev/null 2>&1
done

# The same settings both sides: environments, a policy (records name it, import checks it).
settings="CREATE EXTENSION keypal;
SELECT keypal_configure(environments => '{\"live\": {\"prefix\": \"sk_live_\"}, \"test\": {\"prefix\": \"sk_test_\"}}');
SELECT keypal_define_policy('xfer:ro', scopes => '{read}', max_ttl => '90d');
CREATE TABLE plain_keys (label text PRIMARY KEY, key text, id uuid);"
q -d $src -c "$settings" >/dev/null
q -d $dst -c "$settings" >/dev/null

q -d $src >/dev/null <<'SQL'
SET keypal.signing_secret = 'transfer server secret';
INSERT INTO plain_keys SELECT 'root', key, id FROM keypal_create(owner_id => 'x', scopes => '{read,write}', env => 'live', org_id => 'acme');
INSERT INTO plain_keys SELECT 'child', key, id FROM keypal_create(owner_id => 'x', scopes => '{read}', parent_id => (SELECT id FROM plain_keys WHERE label = 'root'));
INSERT INTO plain_keys SELECT 'policy', key, id FROM keypal_create(owner_id => 'x', policy => 'xfer:ro', scopes => '{read}');
INSERT INTO plain_keys SELECT 'ips', key, id FROM keypal_create(owner_id => 'x', allowed_ips => '{10.0.0.0/8}', blocked_ips => '{10.9.0.0/16}');
INSERT INTO plain_keys SELECT 'regions', key, id FROM keypal_create(owner_id => 'x', allowed_regions => '{DE}');
INSERT INTO plain_keys SELECT 'resources', key, id FROM keypal_create(owner_id => 'x', scopes => '{}', resources => '{"project:1": ["write"]}');
INSERT INTO plain_keys SELECT 'revoked', key, id FROM keypal_create(owner_id => 'x', env => 'test');
INSERT INTO plain_keys SELECT 'disabled', key, id FROM keypal_create(owner_id => 'x');
INSERT INTO plain_keys SELECT 'expired', key, id FROM keypal_create(owner_id => 'x', expires_in => '1s');
INSERT INTO plain_keys SELECT 'limited', key, id FROM keypal_create(owner_id => 'x', rate_limit => '{"requests": 100, "window": "1h"}', quota => '{"limit": 100, "period": "month"}');
INSERT INTO plain_keys SELECT 'scheduled', key, id FROM keypal_create(owner_id => 'x', expires_in => '30d', notify_before => '7d', disable_at => now() + interval '10 days', revoke_at => now() + interval '20 days');
INSERT INTO plain_keys SELECT 'signing', key, id FROM keypal_create(owner_id => 'x', signing => true, scopes => '{read}');
SELECT keypal_revoke((SELECT id FROM plain_keys WHERE label = 'revoked'), reason => 'gone');
SELECT keypal_disable((SELECT id FROM plain_keys WHERE label = 'disabled'));
INSERT INTO plain_keys SELECT 'rot1', key, id FROM keypal_rotate((SELECT id FROM plain_keys WHERE label = 'root'), grace => '1h');
INSERT INTO plain_keys SELECT 'rot2', key, id FROM keypal_rotate((SELECT id FROM plain_keys WHERE label = 'policy'));
SELECT pg_sleep(1.1);  -- 'expired' expires
SQL

# The verdicts for a set of requests per key.
verdicts() {
    q -d "$1" -c "SELECT string_agg(p.label || ':' || r.n || '=' || coalesce(v.error_code, 'VALID'), ' ' ORDER BY p.label, r.n)
                    FROM plain_keys p
                   CROSS JOIN (VALUES (1, NULL, NULL, NULL::inet, NULL, NULL), (2, 'read', NULL, NULL, NULL, NULL),
                                      (3, 'write', NULL, NULL, NULL, NULL), (4, NULL, NULL, '10.1.2.3', 'DE', NULL),
                                      (5, NULL, NULL, '10.9.1.1', 'FR', 'live'), (6, 'write', 'project:1', NULL, NULL, NULL))
                         AS r(n, scope, resource, ip, country, env),
                   LATERAL keypal_verify(p.key, scope => r.scope, resource => r.resource, ip => r.ip, country => r.country, env => r.env) v"
}
want=$(verdicts $src)
echo "# verdicts: $want"
q -d $src -c "SELECT keypal_export()" >"$work/export.json"
q -d $src -c "COPY plain_keys TO STDOUT" >"$work/plain.tsv"
q -d $dst -c "COPY plain_keys FROM STDIN" <"$work/plain.tsv"

is "$(q -d $dst -c "SELECT (imported, skipped, overwritten)::text FROM keypal_import(pg_read_file('$work/export.json')::jsonb)")" \
   "(14,0,0)" "every key exported from one database imports into another"
ok "$( ! grep -q "$(q -d $src -c "SELECT key FROM plain_keys WHERE label = 'root'")" "$work/export.json"; echo $?)" "the export file holds no plaintext"
is "$(verdicts $dst)" "$want" "every key verifies there as it did (valid, or the same error code) for every request"
kinds=0
for v in root:1=VALID policy:1=REVOKED revoked:1=REVOKED disabled:1=DISABLED expired:1=EXPIRED child:5=ENV_MISMATCH \
         ips:1=IP_NOT_ALLOWED ips:4=VALID regions:1=REGION_NOT_ALLOWED child:3=INSUFFICIENT_SCOPE resources:6=VALID; do
    case " $want " in *" $v "*) ;; *) kinds=1; echo "# missing verdict $v" ;; esac
done
ok "$kinds" "(the verdicts are of every kind: valid, in a rotation's grace, revoked, disabled, expired, env, ip, region, scope, resource)"
is "$(q -d $dst -c "SELECT md5(string_agg((to_jsonb(k) - 'updated_at')::text, '|' ORDER BY id)) FROM keypal.keys k")" \
   "$(q -d $src -c "SELECT md5(string_agg((to_jsonb(k) - 'updated_at' - 'last_used_at' || jsonb_build_object('last_used_at', i.last_used_at))::text, '|' ORDER BY k.id)) FROM keypal.keys k JOIN keypal.key_info i USING (id)")" \
   "the rows are the same: settings, state, links, hashes (last_used_at as of the export)"
is "$(q -d $dst -c "SELECT string_agg(p.label || ':' || t.kind, ' ' ORDER BY p.label, t.kind) FROM keypal.key_timers t JOIN plain_keys p ON p.id = t.key_id")" \
   "$(q -d $src -c "SELECT string_agg(p.label || ':' || t.kind, ' ' ORDER BY p.label, t.kind) FROM keypal.key_timers t JOIN plain_keys p ON p.id = t.key_id WHERE t.due_at > now()")" \
   "schedules still ahead are armed again (key timers); moments already past are not acted on twice"
is "$(q -d $dst -c "SELECT string_agg(DISTINCT action, ',') FROM keypal.audit_log")" "imported" "the import is audited as imported"
sig_id=$(q -d $src -c "SELECT id FROM plain_keys WHERE label = 'signing'")
secret=$(q -d $src -c "SET keypal.signing_secret = 'transfer server secret'; SELECT keypal.signing_secret_for('$sig_id')" | tail -1)
is "$(q -d $dst -c "SET keypal.signing_secret = 'transfer server secret';
     SELECT keypal_verify_signature('$sig_id', 'POST', '/x', 'b', keypal_sign('$secret', 'POST', '/x', 'b'))" | tail -1)" "t" \
   "a signing key keeps its signing secret (the same id and server secret)"
is "$(q -d $dst -c "SELECT (imported, skipped, overwritten)::text FROM keypal_import(pg_read_file('$work/export.json')::jsonb, 'skip')")" \
   "(0,14,0)" "importing the same file again with skip writes nothing"
is "$(q -d $dst -c "SELECT count(*) FROM keypal.audit_log")" "14" "(and audits nothing)"

# The TypeScript keypal's records, made by JavaScript, with its own salt (appended as it is:
# keypal.typescript_salt), and with a keypal salt set as well.
node "$(dirname "$0")/../../docs/examples/ts_records.js" 50 'ts salt' >"$work/ts.json"
q -d $dst -c "SET keypal.typescript_salt = 'ts salt'; SELECT (imported, skipped, overwritten)::text FROM keypal_import(pg_read_file('$work/ts.json')::jsonb -> 'records')" >"$work/ts.out"
is "$(tail -1 "$work/ts.out")" "(50,0,0)" "50 TypeScript keypal records import"
verdict_ts="SET keypal.salt = 'another salt'; SET keypal.typescript_salt = 'ts salt';
    SELECT string_agg(CASE WHEN (v.error_code IS NULL) = (r->'metadata'->>'revokedAt' IS NULL AND coalesce(r->'metadata'->>'enabled', 'true') = 'true'
                                                            AND coalesce((r->'metadata'->>'expiresAt')::timestamptz > now(), true))
                           AND coalesce(v.error_code, 'REVOKED') IN ('REVOKED', 'DISABLED', 'EXPIRED')
                           THEN 'ok' ELSE r->>'id' || ':' || coalesce(v.error_code, 'VALID') END, ' ')
      FROM jsonb_array_elements(pg_read_file('$work/ts.json')::jsonb -> 'records') r,
           keypal_verify(pg_read_file('$work/ts.json')::jsonb -> 'keys' ->> (r->>'id')) v"
is "$(q -d $dst -c "$verdict_ts" | tail -1 | tr ' ' '\n' | sort -u | tr '\n' ' ')" "ok " \
   "each verifies with its plaintext (keypal.typescript_salt): valid, or revoked/disabled/expired as its record says"
is "$(q -d $dst -c "SELECT count(*) FROM jsonb_array_elements(pg_read_file('$work/ts.json')::jsonb -> 'records') r,
        keypal_verify(pg_read_file('$work/ts.json')::jsonb -> 'keys' ->> (r->>'id')) v WHERE v.valid OR v.error_code NOT IN ('INVALID_KEY', 'INVALID_FORMAT')")" "0" \
   "without keypal.typescript_salt none does"
is "$(q -d $dst -c "SET keypal.typescript_salt = 'ts salt'; SELECT count(*) FROM jsonb_array_elements(pg_read_file('$work/ts.json')::jsonb -> 'records') r,
        keypal_verify(pg_read_file('$work/ts.json')::jsonb -> 'keys' ->> (r->>'id'), scope => 'write') v
        WHERE v.valid AND NOT r->'metadata'->'scopes' ? 'write'" | tail -1)" "0" "and holds only its scopes"

# Races. A revoke that commits while an overwrite of the same key waits for it stays: the
# overwrite sees the revoked row it locked.
read -r race_id race_key < <(q -d $dst -F ' ' -c "SELECT id, key FROM keypal_create(owner_id => 'race')")
race_export=$(q -d $dst -c "SELECT keypal_export('race')")
{ echo "BEGIN; SELECT keypal_revoke('$race_id');"; sleep 1.5; echo "COMMIT;"; } | PGAPPNAME=revoker q -d $dst >/dev/null &
poll 100 "idle in transaction" q -d $dst -c "SELECT state FROM pg_stat_activity WHERE application_name = 'revoker'" >/dev/null
q -d $dst -c "SELECT keypal_import('$race_export', 'overwrite')" >/dev/null
wait
is "$(q -d $dst -c "SELECT coalesce(error_code, 'VALID') FROM keypal_verify('$race_key')")" "REVOKED" \
   "a revoke committed while an overwrite of the key waited is kept"
# Two imports overwriting the same parent and child at once wait in turn (no deadlock).
family=$(q -d $dst -c "SELECT keypal_export('x', 'acme') || (SELECT jsonb_agg(r) FROM jsonb_array_elements(keypal_export('x')) r
                        WHERE r->>'parent_id' IS NOT NULL)")
for i in 1 2 3 4; do
    q -d $dst -c "SELECT keypal_import('$family', 'overwrite')" >"$work/family.$i" 2>&1 &
done
wait
is "$(cat "$work"/family.* | grep -c -e ERROR -e deadlock) $(cat "$work"/family.* | grep -c '^(')" "0 4" \
   "four concurrent overwrites of a parent and its child all succeed, with no deadlock"
# An import of a child under an existing parent holds the parent FOR SHARE: a revoke of the
# parent waits for the import to commit, then cascades to the child it wrote.
read -r par_id < <(q -d $dst -c "SELECT id FROM keypal_create(owner_id => 'race', scopes => '{read}')")
child=$(q -d $dst -c "SELECT jsonb_build_array(jsonb_build_object('id', gen_random_uuid(), 'key_hash', encode(sha256('sk_race_child'), 'hex'),
                      'owner_id', 'race', 'parent_id', '$par_id', 'scopes', '[\"read\"]'::jsonb))")
{ echo "BEGIN; SELECT keypal_import('$child');"; sleep 1.5; echo "COMMIT;"; } | PGAPPNAME=importer q -d $dst >/dev/null &
poll 100 "idle in transaction" q -d $dst -c "SELECT state FROM pg_stat_activity WHERE application_name = 'importer'" >/dev/null
q -d $dst -c "SELECT keypal_revoke('$par_id')" >/dev/null
wait
is "$(q -d $dst -c "SELECT coalesce(error_code, 'VALID') || ' ' || (SELECT revoke_reason FROM keypal.keys WHERE parent_id = '$par_id')
                     FROM keypal_verify('sk_race_child')")" "REVOKED parent revoked" \
   "a revoke of the parent waits for the import, then cascades to the child it wrote"

# Two imports of the same new key at once: the second waits for the first to commit, then
# refuses with 23505 and writes nothing (on_conflict error), or skips the key (skip).
twice=$(q -d $dst -c "SELECT jsonb_build_array(jsonb_build_object('id', gen_random_uuid(), 'key_hash', encode(sha256('sk_race_twice'), 'hex'),
                      'owner_id', 'twice'))")
race_import() {  # race_import MODE: "Lock" if the second import waited on a lock, then its answer (or SQLSTATE and message)
    # The first holds its import open until the second waits for it on the key's row.
    { echo "BEGIN; SELECT keypal_import('$twice');"
      poll 100 Lock q -d $dst -c "SELECT coalesce(wait_event_type, '') FROM pg_stat_activity WHERE application_name = 'second'" >"$work/waited"
      echo "COMMIT;"; } | PGAPPNAME=first q -d $dst >/dev/null &
    poll 100 "idle in transaction" q -d $dst -c "SELECT state FROM pg_stat_activity WHERE application_name = 'first'" >/dev/null
    PGAPPNAME=second q -d $dst -c "\set VERBOSITY verbose" -c "SELECT (keypal_import('$twice', '$1')).*" 2>&1 |
        sed -n 's/^ERROR:  \([0-9A-Z]*\): \(.*created meanwhile\).*/\1 \2/p; /^[0-9]/p' | sort -u >"$work/second"
    wait
    echo "$(cat "$work/waited"): $(cat "$work/second")"
}
is "$(race_import error)" \
   "Lock: 23505 a key with the same id or hash as one in the data was created meanwhile" \
   "two imports of one new key at once: the second waits for the first, then refuses with 23505"
is "$(q -d $dst -c "SELECT count(*) FROM keypal.keys WHERE owner_id = 'twice'") $(q -d $dst -c "SELECT count(*) FROM keypal.audit_log WHERE owner_id = 'twice'")" \
   "1 1" "(the first import's key, audited once)"
q -d $dst -c "DELETE FROM keypal.keys WHERE owner_id = 'twice'" >/dev/null
is "$(race_import skip)" "Lock: 0|1|0" "with skip, the second waits, then skips it"
is "$(q -d $dst -c "SELECT count(*) FROM keypal.keys WHERE owner_id = 'twice'")" "1" "(one key)"

# Exports too large for one value: one record per row, written as JSON lines by psql, read
# back with COPY in a form that leaves JSON's backslashes alone.
q -d $src -c "SELECT keypal_update((SELECT id FROM plain_keys WHERE label = 'root'), name => E'quote\" back\\\\slash new\\nline')" >/dev/null
q -d $src -c "SELECT keypal_export_records()" >"$work/keys.jsonl"
q -d postgres -c "DROP DATABASE IF EXISTS ${dst}_lines" -c "CREATE DATABASE ${dst}_lines" >/dev/null 2>&1
q -d ${dst}_lines -c "$settings" >/dev/null
q -d ${dst}_lines >/dev/null <<SQL
CREATE TEMP TABLE lines (rec jsonb);
\copy lines FROM '$work/keys.jsonl' WITH (FORMAT csv, QUOTE E'\x01', DELIMITER E'\x02')
CREATE TABLE result AS SELECT * FROM keypal_import((SELECT jsonb_agg(rec) FROM lines));
SQL
is "$(q -d ${dst}_lines -c "SELECT (imported, skipped, overwritten)::text FROM result")" "(14,0,0)" "JSON lines from keypal_export_records import"
is "$(q -d ${dst}_lines -c "SELECT name FROM keypal.keys WHERE id = (SELECT (rec->>'id')::uuid FROM jsonb_array_elements(keypal_export()) rec WHERE rec->>'name' LIKE 'quote%')")" \
   "$(q -d $src -c "SELECT name FROM keypal.keys WHERE id = (SELECT id FROM plain_keys WHERE label = 'root')")" \
   "with quotes, backslashes and newlines intact"
q -d postgres -c "DROP DATABASE IF EXISTS ${dst}_lines WITH (FORCE)" >/dev/null 2>&1

done_testing
