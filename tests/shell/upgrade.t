#!/usr/bin/env bash
# Extension upgrades: for every released version kept in sql/releases/, a database made
# with that version's SQL, holding keys, is updated by ALTER EXTENSION keypal UPDATE (the
# shipped keypal--<old>--<new>.sql scripts) to the current version. Then every key verifies
# as before, and the schema is the one a fresh install makes: pg_dump --schema-only of both
# (--binary-upgrade, so that it writes the extension's own objects, not only CREATE
# EXTENSION), OIDs left out, sorted, compared line by line.
source "$(dirname "$0")/lib.sh"

root=$(cd "$(dirname "$0")/../.." && pwd)
extdir="$(/usr/lib/postgresql/15/bin/pg_config --sharedir)/extension"
current=$(sed -n "s/^default_version = '\(.*\)'/\1/p" "$extdir/keypal.control")
work=$(mktemp -d)
chmod 777 "$work"
added=()
cleanup() {
    for f in "${added[@]}"; do rm -f "$f"; done
    rm -rf "$work"
    for db in keypal_up_old keypal_up_fresh; do
        q -d postgres -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
    done
}
trap cleanup EXIT

# The schema, as text to compare: the OIDs, pg_upgrade's bookkeeping and sequence positions
# (data) left out, each
# line without a trailing comma (a column added by an upgrade comes last in its table).
schema() {
    as_pg "$PGBIN/pg_dump" -h "$PGHOST" -p "$PGPORT" --schema-only --binary-upgrade "$1" 2>/dev/null |
        grep -v -e 'binary_upgrade_set_next_' -e 'binary_upgrade_create_empty_extension' -e '^--' -e '^$' \
                -e 'binary_upgrade_set_missing_value' \
                -e 'pg_catalog.setval(' -e 'relfrozenxid' -e "^WHERE oid = '[0-9]*';$" -e '^\\restrict ' -e '^\\unrestrict ' |
        sed -e 's/,$//' | sort
}
# What a sorted dump cannot show: each function's whole definition (its lines in order),
# comment and privileges; the tables pg_dump saves the rows of (extconfig, and their
# conditions); each table's columns in order (dropped ones left out).
catalog() {
    q -d "$1" -c "SELECT x FROM (
        SELECT 'function ' || p.oid::regprocedure::text || ' ' || md5(pg_get_functiondef(p.oid)) || ' '
               || md5(coalesce(obj_description(p.oid, 'pg_proc'), '')) || ' ' || coalesce(p.proacl::text, '') AS x
          FROM pg_proc p
          JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
          JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'keypal'
        UNION ALL
        SELECT 'dumped ' || c.x::regclass::text || ' ' || coalesce(e.extcondition[c.n], '')
          FROM pg_extension e, unnest(e.extconfig) WITH ORDINALITY AS c(x, n) WHERE e.extname = 'keypal'
        UNION ALL
        SELECT 'columns ' || c.oid::regclass::text || ' '
               || string_agg(a.attname || ' ' || format_type(a.atttypid, a.atttypmod), ', ' ORDER BY a.attnum)
          FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid
         WHERE c.relnamespace = 'keypal'::regnamespace AND a.attnum > 0 AND NOT a.attisdropped
         GROUP BY c.oid) t ORDER BY x"
}
verdicts() {
    q -d "$1" -c "SELECT string_agg(p.label || '=' || coalesce(v.error_code, 'VALID'), ' ' ORDER BY p.label)
                    FROM plain_keys p, keypal_verify(p.key, scope => 'read') v"
}

releases=("$root"/sql/releases/keypal--*.sql)
ok "$( [ -e "${releases[0]}" ]; echo $?)" "there is a released version to upgrade from (sql/releases/)"
is "$(q -d postgres -c "SELECT default_version FROM pg_available_extensions WHERE name = 'keypal'")" "$current" \
   "the installed control file's default version"
ok "$(echo "$current" | grep -Eq '^[0-9]+\.[0-9]+\.[0-9]+$'; echo $?)" "is a release version ($current)"

for release in "${releases[@]}"; do
    old=$(basename "$release" .sql | sed 's/^keypal--//')
    # (a development install may have left a different file of that name: the release's wins)
    [ -e "$extdir/keypal--$old.sql" ] || added+=("$extdir/keypal--$old.sql")
    cp "$release" "$extdir/keypal--$old.sql"
    for db in keypal_up_old keypal_up_fresh; do
        q -d postgres -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db" >/dev/null 2>&1
    done
    q -d keypal_up_old >/dev/null <<SQL
CREATE EXTENSION keypal VERSION '$old';
SELECT keypal_configure(prefix => 'sk_', rate_limit => '{"requests": 1000, "window": "1m"}');
SELECT keypal_define_policy('up:ro', scopes => '{read}', max_ttl => '90d');
CREATE TABLE plain_keys (label text PRIMARY KEY, key text, id uuid);
INSERT INTO plain_keys SELECT 'root', key, id FROM keypal_create(owner_id => 'u', scopes => '{read,write}');
INSERT INTO plain_keys SELECT 'child', key, id FROM keypal_create(owner_id => 'u', scopes => '{read}', parent_id => (SELECT id FROM plain_keys WHERE label = 'root'));
INSERT INTO plain_keys SELECT 'policy', key, id FROM keypal_create(owner_id => 'u', policy => 'up:ro', scopes => '{read}');
INSERT INTO plain_keys SELECT 'write_only', key, id FROM keypal_create(owner_id => 'u', scopes => '{write}');
INSERT INTO plain_keys SELECT 'revoked', key, id FROM keypal_create(owner_id => 'u');
INSERT INTO plain_keys SELECT 'disabled', key, id FROM keypal_create(owner_id => 'u', scopes => '{read}', quota => '{"limit": 50}');
INSERT INTO plain_keys SELECT 'scheduled', key, id FROM keypal_create(owner_id => 'u', scopes => '{read}', expires_in => '30d', notify_before => '7d');
SELECT keypal_revoke((SELECT id FROM plain_keys WHERE label = 'revoked'));
SELECT keypal_disable((SELECT id FROM plain_keys WHERE label = 'disabled'));
INSERT INTO plain_keys SELECT 'rotated', key, id FROM keypal_rotate((SELECT id FROM plain_keys WHERE label = 'policy'), grace => '1h');
SELECT keypal_add_webhook('https://hooks.example.com/up', 'whsec_up');
SQL
    # durations as bare numbers, which 0.1.0 took as seconds (later versions refuse them)
    if [ "$old" = 0.1.0 ]; then bare=''; else bare=s; fi
    q -d keypal_up_old >/dev/null <<SQL
SELECT keypal_configure(retention => '{"usage": "8640000$bare"}');
SELECT keypal_define_template('up:bare', '{"expires_in": "86400$bare", "scopes": ["read"]}');
SQL
    # (this library, on the older schema, as between a package upgrade and ALTER EXTENSION:
    # each key made is recorded once, by that schema's trigger)
    is "$(q -d keypal_up_old -c "SELECT count(*) FROM keypal.audit_log WHERE action = 'created'")" \
       "$(q -d keypal_up_old -c "SELECT count(*) FROM keypal.keys")" "$old: one created audit row per key made on the old schema"
    before=$(verdicts keypal_up_old)
    audit_before=$(q -d keypal_up_old -c "SELECT count(*) FROM keypal.audit_log")
    q -d keypal_up_old -c "ALTER EXTENSION keypal UPDATE" >/dev/null
    is "$(q -d keypal_up_old -c "SELECT extversion FROM pg_extension WHERE extname = 'keypal'")" "$current" \
       "$old: ALTER EXTENSION keypal UPDATE reaches $current"
    is "$(verdicts keypal_up_old)" "$before" "$old: every key verifies after the update as before"
    ok "$(echo "$before" | grep -q 'root=VALID' && echo "$before" | grep -q 'revoked=REVOKED' && echo "$before" | grep -q 'write_only=INSUFFICIENT_SCOPE'; echo $?)" \
       "$old: (valid ones and refused ones)"
    is "$(q -d keypal_up_old -c "SELECT count(*) FROM keypal.audit_log")" "$audit_before" "$old: the audit log is kept"
    q -d keypal_up_fresh -c "CREATE EXTENSION keypal" >/dev/null
    q -d keypal_up_old -c "DROP TABLE plain_keys"
    schema keypal_up_old >"$work/upgraded.sql"
    schema keypal_up_fresh >"$work/fresh.sql"
    ok "$( [ "$(wc -l <"$work/fresh.sql")" -gt 1000 ]; echo $?)" "$old: (the dump holds the extension's objects: $(wc -l <"$work/fresh.sql") lines)"
    if diff "$work/fresh.sql" "$work/upgraded.sql" >"$work/diff"; then
        ok 0 "$old: the upgraded schema equals a fresh $current install's"
    else
        ok 1 "$old: the upgraded schema equals a fresh $current install's"
        sed 's/^/#   /' "$work/diff" | head -40
    fi
    catalog keypal_up_old >"$work/upgraded.cat"
    catalog keypal_up_fresh >"$work/fresh.cat"
    if [ "$(wc -l <"$work/fresh.cat")" -gt 100 ] && diff "$work/fresh.cat" "$work/upgraded.cat" >"$work/diff"; then
        ok 0 "$old: every function's definition (in order), comment and grants, the dumped tables and column orders equal a fresh install's ($(wc -l <"$work/fresh.cat") items)"
    else
        ok 1 "$old: every function's definition (in order), comment and grants, the dumped tables and column orders equal a fresh install's"
        sed 's/^/#   /' "$work/diff" | head -20
    fi
    is "$(q -d keypal_up_old -c "SELECT (SELECT retention->>'usage' FROM keypal.settings) || ' ' || (SELECT options->>'expires_in' FROM keypal.templates WHERE name = 'up:bare')")" \
       "$( [ "$old" = 0.1.0 ] && echo '8640000s 86400s' || q -d keypal_up_old -c "SELECT (SELECT retention->>'usage' FROM keypal.settings) || ' ' || (SELECT options->>'expires_in' FROM keypal.templates WHERE name = 'up:bare')")" \
       "$old: durations stored as bare numbers get their unit"
    ok "$(q -d keypal_up_old -c "SELECT count(*) FROM keypal_create_from_template('up:bare', 'u')" >/dev/null && \
          q -d keypal_up_old -c "CALL keypal_run_maintenance()" >/dev/null; echo $?)" \
       "$old: the template and maintenance work with them"
    # What the new version added works in the upgraded database.
    is "$(q -d keypal_up_old -c "SELECT (imported, skipped, overwritten)::text FROM keypal_import(keypal_export('u'), 'skip')")" \
       "(0,$(q -d keypal_up_old -c "SELECT count(*) FROM keypal.keys WHERE owner_id = 'u'"),0)" \
       "$old: the new functions work after the update (export, import)"
    is "$(q -d keypal_up_old -c "SET ROLE keypal_plain; SELECT count(*) FROM pg_proc p WHERE p.proname LIKE 'keypal%' AND has_function_privilege(p.oid, 'EXECUTE')")" \
       "$(q -d keypal_up_fresh -c "SET ROLE keypal_plain; SELECT count(*) FROM pg_proc p WHERE p.proname LIKE 'keypal%' AND has_function_privilege(p.oid, 'EXECUTE')")" \
       "$old: PUBLIC may run the same functions as in a fresh install"
done
done_testing
