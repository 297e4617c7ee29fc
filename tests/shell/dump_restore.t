#!/usr/bin/env bash
# Backups restore: a plain pg_dump / pg_restore round trip (custom format, and a plain SQL
# script through psql), with no special flags, brings back every key (children, rotation
# chains), the settings, policies, templates, the audit log, events, usage, webhooks (their
# secrets and queued deliveries) and key schedules identical, and every key verifies
# exactly as before. Rows written afterwards get fresh ids.
source "$(dirname "$0")/lib.sh"

PGBIN=/usr/lib/postgresql/15/bin
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
work=$(mktemp -d)
chmod 777 "$work"
src=keypal_dump_src
trap 'rm -rf "$work"; q -d postgres -c "DROP DATABASE IF EXISTS $src WITH (FORCE)" -c "DROP DATABASE IF EXISTS ${src}_fc WITH (FORCE)" -c "DROP DATABASE IF EXISTS ${src}_sql WITH (FORCE)" >/dev/null 2>&1' EXIT

q -d postgres -c "DROP DATABASE IF EXISTS $src WITH (FORCE)" -c "CREATE DATABASE $src" >/dev/null 2>&1
q -d "$src" >/dev/null <<'SQL'
CREATE EXTENSION keypal;
SELECT keypal_configure(prefix => 'sk_', environments => '{"live": {"prefix": "sk_live_"}, "test": {"prefix": "sk_test_"}}',
                        rate_limit => '{"requests": 1000, "window": "1m"}');
SELECT keypal_define_policy('dump:ro', scopes => '{read}', max_ttl => '90d');
SELECT keypal_define_template('dump:t', '{"scopes": ["read"], "tags": ["t"]}');
-- The plaintexts ride along in a table of our own, so the restored copy can verify them.
CREATE TABLE plain_keys (label text PRIMARY KEY, key text, id uuid);
INSERT INTO plain_keys SELECT 'root', key, id FROM keypal_create(owner_id => 'd', scopes => '{read,write}', env => 'live');
INSERT INTO plain_keys SELECT 'child', key, id FROM keypal_create(owner_id => 'd', scopes => '{read}', parent_id => (SELECT id FROM plain_keys WHERE label = 'root'));
INSERT INTO plain_keys SELECT 'grandchild', key, id FROM keypal_create(owner_id => 'd', scopes => '{read}', parent_id => (SELECT id FROM plain_keys WHERE label = 'child'));
INSERT INTO plain_keys SELECT 'policy', key, id FROM keypal_create(owner_id => 'd', policy => 'dump:ro', scopes => '{read}');
INSERT INTO plain_keys SELECT 'template', key, id FROM keypal_create_from_template('dump:t', 'd');
INSERT INTO plain_keys SELECT 'revoked', key, id FROM keypal_create(owner_id => 'd', env => 'test');
INSERT INTO plain_keys SELECT 'disabled', key, id FROM keypal_create(owner_id => 'd', quota => '{"limit": 5}');
INSERT INTO plain_keys SELECT 'limited', key, id FROM keypal_create(owner_id => 'd', rate_limit => '{"requests": 2, "window": "1h"}');
SELECT keypal_revoke((SELECT id FROM plain_keys WHERE label = 'revoked'), reason => 'gone');
SELECT keypal_disable((SELECT id FROM plain_keys WHERE label = 'disabled'));
-- A rotation chain of three, the root's children moving along (the root row is updated
-- after its children were written: a child precedes its parent in the table).
INSERT INTO plain_keys SELECT 'rot1', key, id FROM keypal_rotate((SELECT id FROM plain_keys WHERE label = 'root'), grace => '1h');
INSERT INTO plain_keys SELECT 'rot2', key, id FROM keypal_rotate((SELECT id FROM plain_keys WHERE label = 'rot1'), grace => '1h');
SELECT keypal_update((SELECT id FROM plain_keys WHERE label = 'child'), name => 'renamed');
SELECT keypal_track_usage((SELECT id FROM plain_keys WHERE label = 'policy'), endpoint => '/x', tokens => 3);
-- Webhooks (one disabled, with deliveries queued; the other to a target refused as private,
-- so that neither copy delivers anything), schedules and their timers.
SELECT keypal_configure(retention => '{"audit_log": "5y"}', webhook_max_attempts => 3);
SELECT keypal_add_webhook('http://127.0.0.1:9/hook', 'whsec_dump', '{key.revoked,key.updated}');
SELECT keypal_disable_webhook(keypal_add_webhook('https://hooks.example.com/dump', 'whsec_dump2'));
INSERT INTO plain_keys SELECT 'scheduled', key, id FROM keypal_create(owner_id => 'd', expires_in => '30d', notify_before => '7d', revoke_at => now() + interval '20 days');
SELECT keypal_update((SELECT id FROM plain_keys WHERE label = 'scheduled'), name => 'queued for the webhooks');
-- Keys hashed under a salt (for the restore into a fresh cluster configured with it).
SET keypal.salt = 'dump salt';
CREATE TABLE salted_keys (label text PRIMARY KEY, key text, id uuid);
INSERT INTO salted_keys SELECT 'salted', key, id FROM keypal_create(owner_id => 'salted', scopes => '{read}');
INSERT INTO salted_keys SELECT 'salted_revoked', key, id FROM keypal_create(owner_id => 'salted');
SELECT keypal_revoke((SELECT id FROM salted_keys WHERE label = 'salted_revoked'));
SQL

# A fingerprint of everything a restore must bring back, identical.
fingerprint() {
    q -d "$1" -c "SELECT md5(string_agg(t, '|' ORDER BY t)) FROM (
        SELECT 'k' || k::text AS t FROM keypal.keys k
        UNION ALL SELECT 'a' || a::text FROM keypal.audit_log a
        UNION ALL SELECT 'e' || e::text FROM keypal.events e
        UNION ALL SELECT 's' || s::text FROM keypal.settings s
        UNION ALL SELECT 'p' || p::text FROM keypal.policies p
        UNION ALL SELECT 't' || t::text FROM keypal.templates t
        UNION ALL SELECT 'u' || u::text FROM keypal.usage u
        UNION ALL SELECT 'w' || (w.id, w.url, w.secret, w.events, w.enabled)::text FROM keypal.webhooks w
        UNION ALL SELECT 'q' || (q.webhook_id, q.event_id, q.key_id)::text FROM keypal.webhook_queue q
        UNION ALL SELECT 'm' || m::text FROM keypal.key_timers m) x"
}
verdicts() {
    q -d "$1" -c "SELECT string_agg(p.label || '=' || coalesce(v.error_code, 'VALID'), ' ' ORDER BY p.label)
                    FROM plain_keys p, keypal_verify(p.key) v"
}
# (Verify records last_used_at: take the verdicts first, then the fingerprint and dump.)
want_verdicts=$(verdicts "$src")
want_fp=$(fingerprint "$src")
want_counts=$(q -d "$src" -c "SELECT (SELECT count(*) FROM keypal.keys) || ' ' || (SELECT count(*) FROM keypal.audit_log)")

as_pg "$PGBIN/pg_dump" -Fc -f "$work/keypal.dump" "$src" 2>"$work/dump.err"
as_pg "$PGBIN/pg_dump" -f "$work/keypal.sql" "$src" 2>>"$work/dump.err"

for kind in fc sql; do
    db=${src}_$kind
    q -d postgres -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db" >/dev/null 2>&1
    rc=0
    if [ "$kind" = fc ]; then
        as_pg "$PGBIN/pg_restore" -d "$db" "$work/keypal.dump" >"$work/restore.out" 2>&1 || rc=$?
    else
        q -d "$db" -v ON_ERROR_STOP=1 -f "$work/keypal.sql" >"$work/restore.out" 2>&1 || rc=$?
    fi
    is "$rc" 0 "$kind: the restore ran without an error"
    [ "$rc" = 0 ] || sed 's/^/# /' "$work/restore.out" | grep -i error | head -5
    is "$(q -d "$db" -c "SELECT (SELECT count(*) FROM keypal.keys) || ' ' || (SELECT count(*) FROM keypal.audit_log)")" \
       "$want_counts" "$kind: every key and audit row is back ($want_counts)"
    is "$(fingerprint "$db")" "$want_fp" "$kind: keys, audit log, events, settings, policies, templates, usage identical"
    is "$(verdicts "$db")" "$want_verdicts" "$kind: every key verifies exactly as before"
    is "$(q -d "$db" -c "SELECT count(*) FROM keypal_history((SELECT id FROM plain_keys WHERE label = 'rot2'))")" 3 \
       "$kind: the rotation chain is whole"
    is "$(q -d "$db" -c "SELECT parent_id = (SELECT id FROM plain_keys WHERE label = 'rot2') FROM keypal.keys
                          WHERE id = (SELECT id FROM plain_keys WHERE label = 'child')")" t "$kind: children follow the rotated key"
    # New writes continue after the restored ids.
    q -d "$db" -c "SELECT keypal_revoke((SELECT id FROM plain_keys WHERE label = 'rot2'))" >/dev/null
    is "$(q -d "$db" -c "SELECT count(*) FROM keypal.audit_log WHERE action = 'revoked' AND id > (SELECT max(id) - 3 FROM keypal.audit_log)")" 3 \
       "$kind: a revoke after the restore is audited (key and both descendants), with fresh ids"
    is "$(q -d "$db" -c "SELECT coalesce(error_code, 'VALID') FROM keypal_verify((SELECT key FROM plain_keys WHERE label = 'grandchild'))")" \
       REVOKED "$kind: and cascades as before"
done

# A fresh cluster whose keypal.salt is the same: the custom-format dump restores into it
# with the audit log intact, and the salted keys verify there with no session setting
# (the unsalted ones do not: the salt is part of every hash).
fresh=$work/fresh
bash "$(dirname "$0")/../../scripts/cluster.sh" start "$fresh" 55462 "keypal.salt = 'dump salt'" >/dev/null
trap 'bash "$(dirname "$0")/../../scripts/cluster.sh" stop "$fresh" >/dev/null 2>&1 || true; rm -rf "$work"; q -d postgres -c "DROP DATABASE IF EXISTS $src WITH (FORCE)" -c "DROP DATABASE IF EXISTS ${src}_fc WITH (FORCE)" -c "DROP DATABASE IF EXISTS ${src}_sql WITH (FORCE)" >/dev/null 2>&1' EXIT
fq() { q -h "$fresh" -p 55462 "$@"; }
fq -d postgres -c "CREATE DATABASE restored" >/dev/null
rc=0
as_pg "$PGBIN/pg_restore" -h "$fresh" -p 55462 -d restored "$work/keypal.dump" >"$work/restore_fresh.out" 2>&1 || rc=$?
is "$rc" 0 "fresh cluster: the restore ran without an error"
is "$(fq -d restored -c "SELECT (SELECT count(*) FROM keypal.keys) || ' ' || (SELECT count(*) FROM keypal.audit_log)")" \
   "$want_counts" "fresh cluster: every key and audit row is back"
is "$(PGHOST=$fresh PGPORT=55462 fingerprint restored)" "$want_fp" "fresh cluster: keys, audit log, events, settings, policies, templates, usage identical"
is "$(fq -d restored -c "SELECT string_agg(s.label || '=' || coalesce(v.error_code, 'VALID'), ' ' ORDER BY s.label)
                          FROM salted_keys s, keypal_verify(s.key, scope => 'read') v")" \
   "salted=VALID salted_revoked=REVOKED" "fresh cluster: keys made under the same salt verify as before, with no session setting"
is "$(fq -d restored -c "SELECT (keypal_verify((SELECT key FROM plain_keys WHERE label = 'policy'))).valid")" f \
   "fresh cluster: (keys hashed under another salt do not)"

# Rate windows belong to a database: the restored copies hold the same key ids, and each
# counts its own.
limited=$(q -d "$src" -c "SELECT key FROM plain_keys WHERE label = 'limited'")
for _ in 1 2 3; do q -d "$src" -c "SELECT valid FROM keypal_verify('$limited')" >/dev/null; done
is "$(q -d "$src" -c "SELECT coalesce(error_code, 'VALID') FROM keypal_verify('$limited')")" RATE_LIMITED \
   "the rate-limited key is spent in the original database"
is "$(q -d "${src}_fc" -c "SELECT coalesce(error_code, 'VALID') FROM keypal_verify('$limited')")" VALID \
   "the same key id in a restored copy counts its own window"
# A COPY into keypal.keys counts as a restore (the dump brings the audit rows) only for the
# table's owner (or a superuser). Another role granted INSERT cannot write the table at all
# (its CHECK and triggers call keypal's internal functions); granted those too, and the
# tables the trigger writes, its COPY is audited like any INSERT.
copy_as() {  # copy_as ROLE ID: one key row by COPY, as ROLE; prints psql's errors
    printf '%s\t\\\\x%s\tsha256\tcopier\n' "$2" "${2: -2}" |
        q -d "$src" -c "SET ROLE $1" -c "COPY keypal.keys (id, key_hash, algorithm, owner_id) FROM STDIN" 2>&1 || true
}
q -d "$src" -c "DROP ROLE IF EXISTS keypal_copier" -c "CREATE ROLE keypal_copier" \
  -c "GRANT USAGE ON SCHEMA keypal TO keypal_copier" -c "GRANT INSERT ON keypal.keys TO keypal_copier" >/dev/null 2>&1
ok "$(grep -q "permission denied" <<<"$(copy_as keypal_copier 00000000-0000-4000-8000-0000000c0901)"; echo $?)" \
   "a role granted INSERT on keypal.keys cannot COPY into it"
q -d "$src" -c "GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA keypal TO keypal_copier" \
  -c "GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA keypal TO keypal_copier" \
  -c "GRANT USAGE ON ALL SEQUENCES IN SCHEMA keypal TO keypal_copier" >/dev/null
is "$(copy_as keypal_copier 00000000-0000-4000-8000-0000000c0902)" "" "granted keypal's functions and tables, it can"
is "$(q -d "$src" -c "SELECT count(*) FROM keypal.audit_log WHERE key_id = '00000000-0000-4000-8000-0000000c0902' AND action = 'created'")" 1 \
   "and its COPY is audited: it is no restore"
is "$(copy_as postgres 00000000-0000-4000-8000-0000000c0903)" "" "a superuser's COPY"
is "$(q -d "$src" -c "SELECT count(*) FROM keypal.audit_log WHERE key_id = '00000000-0000-4000-8000-0000000c0903'")" 0 \
   "is a restore: no audit row"
q -d "$src" -c "DROP OWNED BY keypal_copier" -c "DROP ROLE keypal_copier" >/dev/null
done_testing
