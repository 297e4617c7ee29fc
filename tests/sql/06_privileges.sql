-- Privileges (SPEC §6), the salt's secrecy, and keypal_authenticate's identity.
BEGIN;
SELECT no_plan();

CREATE TEMP VIEW ext_functions AS
    SELECT p.oid, p.proname, p.prosecdef, p.proconfig, n.nspname
      FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
      JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
      JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'keypal';

SELECT is((SELECT count(*) FROM ext_functions WHERE nspname = 'public' AND proname LIKE 'keypal\_%' AND obj_description(oid, 'pg_proc') IS NULL), 0::bigint,
          'every keypal_* function has a COMMENT');
SELECT is((SELECT string_agg(proname, ', ') FROM ext_functions WHERE prosecdef AND NOT coalesce(array_to_string(proconfig, ',') LIKE '%search_path=pg_catalog, pg_temp%', false)), NULL,
          'every SECURITY DEFINER function pins search_path');
SELECT set_eq($$SELECT proname::text FROM ext_functions WHERE has_function_privilege('keypal_plain', oid, 'EXECUTE')$$,
    ARRAY['keypal_verify', 'keypal_verify_many', 'keypal_verify_headers', 'keypal_check', 'keypal_require',
          'keypal_authenticate', 'keypal_authenticate_request', 'keypal_current_key_id', 'keypal_current_owner',
          'keypal_current_org', 'keypal_current_scopes', 'keypal_current_has_scope', 'keypal_has_scope',
          'keypal_has_any_scope', 'keypal_has_all_scopes', 'keypal_sign', 'keypal_verify_signature'],
    'PUBLIC may execute the verify family and request signing only');
SELECT is((SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = 'keypal' AND c.relkind IN ('r', 'v', 'S')
              AND (has_table_privilege('keypal_plain', c.oid, 'SELECT') OR has_table_privilege('keypal_plain', c.oid, 'INSERT')
                   OR has_table_privilege('keypal_plain', c.oid, 'UPDATE') OR has_table_privilege('keypal_plain', c.oid, 'DELETE'))), 0::bigint,
          'no keypal table, view or sequence is readable or writable by PUBLIC');

CREATE TEMP TABLE k AS SELECT key, id FROM keypal_create(owner_id => 'priv', org_id => 'org_p', scopes => '{read}', resources => '{"doc:1": ["edit"]}');
CREATE TEMP TABLE other AS SELECT key, id FROM keypal_create(owner_id => 'someone_else', scopes => '{admin}');
GRANT SELECT ON k, other TO keypal_plain, keypal_admin;

SET LOCAL ROLE keypal_plain;
SELECT ok((SELECT valid FROM keypal_verify((SELECT key FROM k), 'read')), 'a plain role can verify');
SELECT ok(keypal_check((SELECT key FROM k)), 'and check');
SELECT throws_ok($$SELECT * FROM keypal_create(owner_id => 'x')$$, '42501', NULL, 'but not create');
SELECT throws_ok($$SELECT * FROM keypal_list()$$, '42501', NULL, 'nor list');
SELECT throws_ok($$SELECT * FROM keypal_get((SELECT id FROM k))$$, '42501', NULL, 'nor get');
SELECT throws_ok($$SELECT keypal_revoke((SELECT id FROM k))$$, '42501', NULL, 'nor revoke');
SELECT throws_ok($$SELECT * FROM keypal_audit()$$, '42501', NULL, 'nor read the audit log');
SELECT throws_ok($$SELECT keypal_configure()$$, '42501', NULL, 'nor configure');
SELECT throws_ok($$SELECT * FROM keypal.keys$$, '42501', NULL, 'nor read keypal.keys');
SELECT throws_ok($$SELECT * FROM keypal.audit_log$$, '42501', NULL, 'nor keypal.audit_log');
SELECT throws_ok($$SELECT * FROM keypal.settings$$, '42501', NULL, 'nor keypal.settings');
SELECT throws_ok($$SELECT keypal.hash_key('x', 'sha256')$$, '42501', NULL, 'nor the hashing helper');
SELECT throws_ok($$SET keypal.salt = 'guess'$$, '42501', NULL, 'nor set the salt');
SELECT throws_ok($$SHOW keypal.salt$$, '42501', NULL, 'nor read the salt');
SELECT is(keypal_has_scope((SELECT id FROM other), 'admin'), false, 'has_scope tells nothing about a key it does not hold');

-- Authenticate: the identity for this transaction, readable by RLS-style functions.
SELECT is(keypal_current_owner(), NULL, 'no identity before authenticate');
SELECT is((keypal_authenticate((SELECT key FROM k), 'read')).owner_id, 'priv', 'authenticate');
SELECT is(keypal_current_owner(), 'priv', 'current_owner');
SELECT is(keypal_current_org(), 'org_p', 'current_org');
SELECT is(keypal_current_key_id(), (SELECT id FROM k), 'current_key_id');
SELECT is(keypal_current_scopes(), '{read}'::text[], 'current_scopes');
SELECT ok(keypal_current_has_scope('read'), 'current_has_scope(read)');
SELECT ok(keypal_current_has_scope('edit', 'doc:1'), 'current_has_scope on a resource');
SELECT ok(NOT keypal_current_has_scope('edit'), 'resource scope needs its resource');
SELECT ok(keypal_has_scope((SELECT id FROM k), 'read'), 'has_scope answers for the authenticated key');
SELECT ok(keypal_has_any_scope((SELECT id FROM k), '{admin,read}'), 'has_any_scope');
SELECT ok(NOT keypal_has_all_scopes((SELECT id FROM k), '{admin,read}'), 'has_all_scopes');
SELECT ok(keypal_has_all_scopes((SELECT id FROM k), '{read,edit}', 'doc:1'), 'has_all_scopes on a resource');
SELECT set_config('keypal.current_owner', 'evil', true);
SET LOCAL keypal.owner = 'evil';
SELECT is(keypal_current_owner(), 'priv', 'settings cannot forge the identity');
SAVEPOINT s;
SELECT keypal_authenticate((SELECT key FROM other));
SELECT is(keypal_current_owner(), 'someone_else', 're-authenticate in a savepoint');
ROLLBACK TO SAVEPOINT s;
SELECT is(keypal_current_owner(), NULL, 'rolling the savepoint back forgets its identity');
SELECT throws_ok($$SELECT keypal_authenticate('sk_nope')$$, '28000', NULL, 'authenticate with a bad key raises 28000');
SELECT is(keypal_current_owner(), NULL, 'a failed authenticate sets nothing');
SELECT set_config('request.headers', json_build_object('authorization', 'Bearer ' || (SELECT key FROM k))::text, true);
SELECT is((keypal_authenticate_request('read')).owner_id, 'priv', 'authenticate_request reads request.headers');
SELECT is(keypal_current_owner(), 'priv', 'and sets the identity');
SELECT set_config('request.headers', '{}', true);
SELECT throws_ok($$SELECT keypal_authenticate_request()$$, '28000', NULL, 'no key in the headers: 28000');
RESET ROLE;

-- A role granted a management function can use it without any table privilege.
GRANT EXECUTE ON FUNCTION keypal_create, keypal_get(uuid), keypal_audit TO keypal_admin;
SET LOCAL ROLE keypal_admin;
CREATE TEMP TABLE admin_key AS SELECT id FROM keypal_create(owner_id => 'by_admin');
SELECT is((SELECT owner_id FROM keypal_get((SELECT id FROM admin_key))), 'by_admin', 'an admin role can create and get');
SELECT is((SELECT actor FROM keypal_audit(key_id => (SELECT id FROM admin_key))), 'keypal_admin', 'actor defaults to the calling role, not the function owner');
SELECT ok(keypal_has_scope((SELECT id FROM other), 'admin'), 'a role allowed keypal_get may ask has_scope of any key');
RESET ROLE;

SELECT * FROM finish();
ROLLBACK;
