-- Lifecycle: revoke (+ cascade and bulk forms), enable/disable, rotate, update, get, list, history,
-- parent/child keys.
BEGIN;
SELECT no_plan();

CREATE FUNCTION pg_temp.code(r keypal.verify_result) RETURNS text LANGUAGE sql AS $$ SELECT coalesce(r.error_code, 'VALID') $$;
CREATE TEMP TABLE k (label text PRIMARY KEY, key text, id uuid);
CREATE FUNCTION pg_temp.key(l text) RETURNS text LANGUAGE sql AS $$ SELECT key FROM k WHERE label = l $$;
CREATE FUNCTION pg_temp.id(l text) RETURNS uuid LANGUAGE sql AS $$ SELECT id FROM k WHERE label = l $$;

-- Revoke: same transaction, 55000 on a revoked key, P0002 on an unknown one.
INSERT INTO k SELECT 'a', key, id FROM keypal_create(owner_id => 'life', org_id => 'acme', scopes => '{read,write}', tags => '{x}');
SELECT is(keypal_revoke(pg_temp.id('a'), reason => 'leaked', actor => 'alice'), 1, 'revoke returns 1');
SELECT is(pg_temp.code(keypal_verify(pg_temp.key('a'))), 'REVOKED', 'revocation takes effect in the same transaction');
SELECT results_eq($$SELECT revoke_reason, revoked_by, revoked_at IS NOT NULL FROM keypal_get(pg_temp.id('a'))$$,
    $$VALUES ('leaked', 'alice', true)$$, 'reason and actor recorded');
SELECT throws_ok(format('SELECT keypal_revoke(%L)', pg_temp.id('a')), '55000', NULL, 'revoking a revoked key: 55000');
SELECT throws_like(format('SELECT keypal_revoke(%L)', pg_temp.id('a')), 'CANNOT_MODIFY_REVOKED%', 'message names CANNOT_MODIFY_REVOKED');
SELECT throws_ok($$SELECT keypal_revoke(gen_random_uuid())$$, 'P0002', NULL, 'unknown id: P0002');
SELECT throws_like($$SELECT keypal_revoke(gen_random_uuid())$$, 'KEY_NOT_FOUND%', 'message names KEY_NOT_FOUND');
SELECT throws_ok($$SELECT keypal_revoke(NULL)$$, '22023', NULL, 'NULL id: 22023 (id is required)');
SELECT throws_ok(format('SELECT keypal_enable(%L)', pg_temp.id('a')), '55000', NULL, 'a revoked key can never be enabled');
SELECT throws_ok(format('SELECT keypal_update(%L, name => %L)', pg_temp.id('a'), 'x'), '55000', NULL, 'a revoked key cannot be updated');
SELECT throws_ok(format('SELECT * FROM keypal_rotate(%L)', pg_temp.id('a')), '55000', NULL, 'a revoked key cannot be rotated');

-- Bulk revokes count keys newly revoked; already revoked ones are no error.
INSERT INTO k SELECT 'b' || i, key, id FROM generate_series(1, 3) i, LATERAL keypal_create(owner_id => 'bulk' || i, org_id => 'acme') WHERE i > 0;
SELECT is(keypal_revoke_many(ARRAY[pg_temp.id('b1'), pg_temp.id('a'), gen_random_uuid()]), 1, 'revoke_many counts only newly revoked keys');
SELECT is(keypal_revoke_many(ARRAY[pg_temp.id('b1')]), 0, 'revoke_many of a revoked key: 0, no error');
SELECT throws_ok($$SELECT keypal_revoke_many(NULL)$$, '22023', NULL, 'revoke_many(NULL): 22023');
INSERT INTO k SELECT 'o' || i, key, id FROM generate_series(1, 3) i, LATERAL keypal_create(owner_id => 'owner_x', org_id => CASE WHEN i = 3 THEN 'other' ELSE 'acme' END) WHERE i > 0;
SELECT is(keypal_revoke_by_owner_and_org('owner_x', 'acme'), 2, 'revoke_by_owner_and_org');
SELECT is(pg_temp.code(keypal_verify(pg_temp.key('o3'))), 'VALID', 'other org untouched');
SELECT is(keypal_revoke_all('owner_x'), 1, 'revoke_all revokes the rest');
SELECT is(keypal_revoke_all('owner_x'), 0, 'revoke_all again: 0');
SELECT throws_ok($$SELECT keypal_revoke_all('')$$, '22023', NULL, 'revoke_all needs an owner');

-- Enable / disable.
INSERT INTO k SELECT 'd', key, id FROM keypal_create(owner_id => 'life', scopes => '{read}');
SELECT ok(keypal_disable(pg_temp.id('d')), 'disable');
SELECT is(pg_temp.code(keypal_verify(pg_temp.key('d'))), 'DISABLED', 'disabled key: DISABLED');
SELECT ok(NOT keypal_disable(pg_temp.id('d')), 'disabling twice changes nothing');
SELECT ok(keypal_enable(pg_temp.id('d')), 'enable');
SELECT is(pg_temp.code(keypal_verify(pg_temp.key('d'))), 'VALID', 'enabled again');
SELECT throws_ok($$SELECT keypal_disable(gen_random_uuid())$$, 'P0002', NULL, 'disable unknown: P0002');

-- Update changes only what is given, never the plaintext.
INSERT INTO k SELECT 'u', key, id FROM keypal_create(owner_id => 'life', name => 'before', description => 'desc', scopes => '{read}', tags => '{a}', metadata => '{"v": 1}', rate_limit => '{"requests": 5, "window": "1m"}');
SELECT is((keypal_update(pg_temp.id('u'), name => 'after', tags => '{b,c}')).name, 'after', 'update returns the key');
SELECT results_eq($$SELECT name, description, scopes, tags, metadata FROM keypal_get(pg_temp.id('u'))$$,
    $$VALUES ('after', 'desc', '{read}'::text[], '{b,c}'::text[], '{"v": 1}'::jsonb)$$, 'only given settings changed');
SELECT lives_ok(format('SELECT keypal_update(%L, scopes => %L, metadata => %L)', pg_temp.id('u'), '{read,deploy}', '{"v": 2}'), 'update scopes and metadata');
SELECT is(pg_temp.code(keypal_verify(pg_temp.key('u'), 'deploy')), 'VALID', 'same plaintext, new scope');
SELECT is((SELECT rate_limit FROM keypal_get(pg_temp.id('u'))), '{"requests": 5, "window": "1m"}'::jsonb, 'rate_limit untouched by SQL NULL');
SELECT is((SELECT rate_limit FROM keypal_update(pg_temp.id('u'), rate_limit => 'null')), 'null'::jsonb, 'JSON null clears rate_limit (the key has none, whatever the defaults)');
SELECT throws_ok(format('SELECT keypal_update(%L, scopes => %L)', pg_temp.id('u'), '{""}'), '22023', NULL, 'bad scopes: 22023');
SELECT throws_ok(format('SELECT keypal_update(%L, expires_in => %L)', pg_temp.id('u'), 'nope'), '22007', NULL, 'bad duration: 22007');
SELECT throws_ok($$SELECT keypal_update(gen_random_uuid(), name => 'x')$$, 'P0002', NULL, 'update unknown: P0002');
SELECT is((SELECT name FROM keypal_get(pg_temp.id('u'))), 'after', 'failed updates changed nothing');

-- Rotate: new key with the same settings, linked both ways; old key stops after grace.
INSERT INTO k SELECT 'r', key, id FROM keypal_create(owner_id => 'life', org_id => 'acme', name => 'rot', scopes => '{read}', tags => '{t}', metadata => '{"k": 1}', expires_in => '10d');
INSERT INTO k SELECT 'r2', key, id FROM keypal_rotate(pg_temp.id('r'));
SELECT is(pg_temp.code(keypal_verify(pg_temp.key('r'))), 'REVOKED', 'no grace: the old key stops at once');
SELECT is(pg_temp.code(keypal_verify(pg_temp.key('r2'), 'read')), 'VALID', 'the new key verifies');
SELECT results_eq($$SELECT owner_id, org_id, name, scopes, tags, metadata, rotated_from FROM keypal_get(pg_temp.id('r2'))$$,
    $$SELECT owner_id, org_id, name, scopes, tags, metadata, id FROM keypal_get(pg_temp.id('r'))$$, 'settings copied, rotated_from set');
SELECT is((SELECT rotated_to FROM keypal_get(pg_temp.id('r'))), pg_temp.id('r2'), 'rotated_to set');
SELECT is((SELECT expires_at FROM keypal_get(pg_temp.id('r2'))), (SELECT expires_at FROM keypal_get(pg_temp.id('r'))), 'a live expiry is kept');
SELECT isnt(pg_temp.key('r2'), pg_temp.key('r'), 'a new plaintext');
INSERT INTO k SELECT 'r3', key, id FROM keypal_rotate(pg_temp.id('r2'), grace => '1h', scopes => '{read,write}');
SELECT is(pg_temp.code(keypal_verify(pg_temp.key('r2'))), 'VALID', 'within the grace period the old key still verifies');
SELECT is((SELECT scopes FROM keypal_get(pg_temp.id('r3'))), '{read,write}'::text[], 'rotate applies overrides');
SELECT is((SELECT old_id FROM keypal_rotate(pg_temp.id('r3'))), pg_temp.id('r3'), 'rotate returns old_id');
SELECT throws_ok(format('SELECT * FROM keypal_rotate(%L)', pg_temp.id('r2')), '55000', NULL, 'a key cannot be rotated twice');
SELECT throws_ok(format('SELECT * FROM keypal_rotate(%L, grace => %L)', pg_temp.id('d'), 'eventually'), '22007', NULL, 'bad grace: 22007');
SELECT results_eq($$SELECT id FROM keypal_history(pg_temp.id('r2'))$$,
    $$SELECT id FROM keypal.keys WHERE owner_id = 'life' AND name = 'rot' ORDER BY created_at, (rotated_from IS NOT NULL), rotated_to IS NULL$$,
    'history walks the whole chain from any member');
SELECT is((SELECT count(*) FROM keypal_history(pg_temp.id('r'))), 4::bigint, 'history: 4 keys in the chain');
SELECT throws_ok($$SELECT * FROM keypal_history(gen_random_uuid())$$, 'P0002', NULL, 'history of unknown: P0002');
-- An expired key's copy does not inherit the past expiry.
INSERT INTO k SELECT 'x', key, id FROM keypal_create(owner_id => 'life', expires_in => '1d');
UPDATE keypal.keys SET expires_at = now() - interval '1 hour', created_at = now() - interval '25 hours' WHERE id = pg_temp.id('x');
INSERT INTO k SELECT 'x2', key, id FROM keypal_rotate(pg_temp.id('x'));
SELECT ok((SELECT expires_at > now() FROM keypal_get(pg_temp.id('x2'))), 'rotating an expired key gives a live expiry');
SELECT is(pg_temp.code(keypal_verify(pg_temp.key('x2'))), 'VALID', 'and the copy verifies');

-- Get / list.
SELECT throws_ok($$SELECT * FROM keypal_get(gen_random_uuid())$$, 'P0002', NULL, 'get unknown: P0002');
SELECT is((SELECT count(*) FROM keypal_list(owner_id => 'life')), (SELECT count(*) FROM keypal.keys WHERE owner_id = 'life' AND (revoked_at IS NULL OR revoked_at > now())), 'list hides revoked keys');
SELECT is((SELECT count(*) FROM keypal_list(owner_id => 'life', include_revoked => true)), (SELECT count(*) FROM keypal.keys WHERE owner_id = 'life'), 'include_revoked');
SELECT is((SELECT count(*) FROM keypal_list(owner_id => 'life', tag => 't')), 2::bigint, 'filter by tag (live keys of the rotation chain)');
SELECT is((SELECT count(*) FROM keypal_list(tags => '{b,c}')), 1::bigint, 'filter by all of tags');
SELECT is((SELECT count(*) FROM keypal_list_by_org('acme')), (SELECT count(*) FROM keypal.keys WHERE org_id = 'acme' AND (revoked_at IS NULL OR revoked_at > now())), 'list_by_org');
SELECT is((SELECT count(*) FROM keypal_list(owner_id => 'life', "limit" => 2)), 2::bigint, 'limit');
SELECT throws_ok($$SELECT * FROM keypal_list("limit" => -1)$$, '22023', NULL, 'negative limit: 22023');

-- Parent/child: subset rule, expiry no later, ancestors checked, cascading revocation.
INSERT INTO k SELECT 'p', key, id FROM keypal_create(owner_id => 'fam', scopes => '{read,write}', resources => '{"project:1": ["deploy"]}', expires_in => '30d');
INSERT INTO k SELECT 'c', key, id FROM keypal_create(owner_id => 'fam', scopes => '{read}', parent_id => pg_temp.id('p'));
INSERT INTO k SELECT 'g', key, id FROM keypal_create(owner_id => 'fam', scopes => '{read}', parent_id => pg_temp.id('c'));
SELECT is((SELECT expires_at FROM keypal_get(pg_temp.id('c'))), (SELECT expires_at FROM keypal_get(pg_temp.id('p'))), 'a child without expiry gets its parent''s');
SELECT throws_ok(format('SELECT * FROM keypal_create(owner_id => %L, scopes => %L, parent_id => %L)', 'fam', '{admin}', pg_temp.id('p')), '22023', NULL, 'child scopes must be a subset');
SELECT throws_ok(format('SELECT * FROM keypal_create(owner_id => %L, resources => %L, parent_id => %L)', 'fam', '{"project:2": ["deploy"]}', pg_temp.id('p')), '22023', NULL, 'child resource scopes must be held by the parent');
SELECT lives_ok(format('SELECT * FROM keypal_create(owner_id => %L, resources => %L, parent_id => %L)', 'fam', '{"project:1": ["deploy", "read"]}', pg_temp.id('p')), 'child resource scopes held by the parent');
SELECT throws_ok(format('SELECT * FROM keypal_create(owner_id => %L, expires_in => %L, parent_id => %L)', 'fam', '60d', pg_temp.id('p')), '22023', NULL, 'child cannot outlive its parent');
SELECT throws_ok(format('SELECT keypal_update(%L, scopes => %L)', pg_temp.id('p'), '{write}'), '22023', NULL, 'a parent cannot drop scopes its children hold');
SELECT is(pg_temp.code(keypal_verify(pg_temp.key('g'), 'read')), 'VALID', 'grandchild verifies');
SELECT keypal_disable(pg_temp.id('p'));
SELECT is(pg_temp.code(keypal_verify(pg_temp.key('g'))), 'DISABLED', 'an ancestor disabled: DISABLED');
SELECT keypal_enable(pg_temp.id('p'));
UPDATE keypal.keys SET expires_at = now() - interval '1 second' WHERE id = pg_temp.id('p');
SELECT is(pg_temp.code(keypal_verify(pg_temp.key('g'))), 'EXPIRED', 'an ancestor expired: EXPIRED');
UPDATE keypal.keys SET expires_at = now() + interval '1 day' WHERE id = pg_temp.id('p');
SELECT is(keypal_revoke(pg_temp.id('p')), 1, 'revoke the parent');
SELECT is(pg_temp.code(keypal_verify(pg_temp.key('g'))), 'REVOKED', 'grandchild revoked by cascade, same transaction');
SELECT is((SELECT count(*) FROM keypal.keys WHERE owner_id = 'fam' AND revoked_at IS NULL), 0::bigint, 'every descendant revoked by the trigger');
SELECT is((SELECT count(*) FROM keypal.audit_log WHERE owner_id = 'fam' AND action = 'revoked'), 4::bigint, 'each revocation audited');
SELECT throws_ok(format('SELECT * FROM keypal_create(owner_id => %L, parent_id => %L)', 'fam', pg_temp.id('p')), '55000', NULL, 'no child of a revoked key');
-- Rotating a parent moves its children to the new key.
INSERT INTO k SELECT 'p2', key, id FROM keypal_create(owner_id => 'fam2', scopes => '{read}');
INSERT INTO k SELECT 'c2', key, id FROM keypal_create(owner_id => 'fam2', scopes => '{read}', parent_id => pg_temp.id('p2'));
INSERT INTO k SELECT 'p3', key, id FROM keypal_rotate(pg_temp.id('p2'));
SELECT is((SELECT parent_id FROM keypal_get(pg_temp.id('c2'))), pg_temp.id('p3'), 'rotation re-parents children');
SELECT is(pg_temp.code(keypal_verify(pg_temp.key('c2'))), 'VALID', 'the child survives its parent''s rotation');


-- The cascade, and a rotation's move of children, update only where there is a child to
-- change: found among many parents, and judged as before (a child revoked already keeps its
-- revocation; one in a rotation's grace is revoked now).
INSERT INTO k SELECT 'q' || i, key, id FROM generate_series(1, 5) i, keypal_create(owner_id => 'fam3', name => 'q' || i, scopes => '{read}');
INSERT INTO k SELECT 'cq3', key, id FROM keypal_create(owner_id => 'fam3c', scopes => '{read}', parent_id => pg_temp.id('q3'));
INSERT INTO k SELECT 'cq4', key, id FROM keypal_create(owner_id => 'fam3c', scopes => '{read}', parent_id => pg_temp.id('q4'));
INSERT INTO k SELECT 'cq5', key, id FROM keypal_create(owner_id => 'fam3c', scopes => '{read}', parent_id => pg_temp.id('q5'));
SELECT keypal_revoke(pg_temp.id('cq4'), reason => 'manual');
UPDATE keypal.keys SET revoked_at = now() + interval '1 hour' WHERE id = pg_temp.id('cq3');
CREATE TEMP TABLE cq4_before AS SELECT revoked_at FROM keypal.keys WHERE id = pg_temp.id('cq4');
SELECT is(keypal_revoke_all('fam3'), 5, 'revoke_all: the five parents');
SELECT is((SELECT revoke_reason FROM keypal.keys WHERE id = pg_temp.id('cq5')), 'parent revoked', 'the last parent''s child is revoked by the cascade');
SELECT is((SELECT revoke_reason || ' ' || (revoked_at <= now())::text FROM keypal.keys WHERE id = pg_temp.id('cq3')),
          'parent revoked true', 'a child in its grace is revoked now');
SELECT is((SELECT revoke_reason FROM keypal.keys WHERE id = pg_temp.id('cq4')), 'manual', 'a child revoked already keeps its reason');
SELECT is((SELECT revoked_at FROM keypal.keys WHERE id = pg_temp.id('cq4')), (SELECT revoked_at FROM cq4_before), '... and its moment');
SELECT is((SELECT count(*) FROM keypal.audit_log WHERE key_id = pg_temp.id('cq4') AND action = 'revoked'), 1::bigint, '... and is audited once');
-- A parent whose only child is in a rotation's grace: the cascade still finds it (revoked
-- now); a rotation moves such a child, and leaves one revoked already under the old key.
INSERT INTO k SELECT 'g1', key, id FROM keypal_create(owner_id => 'fam5', scopes => '{read}');
INSERT INTO k SELECT 'gc1', key, id FROM keypal_create(owner_id => 'fam5c', scopes => '{read}', parent_id => pg_temp.id('g1'));
UPDATE keypal.keys SET revoked_at = now() + interval '1 hour' WHERE id = pg_temp.id('gc1');
SELECT is(keypal_revoke(pg_temp.id('g1')), 1, 'revoke a parent whose only child is in its grace');
SELECT is((SELECT revoke_reason || ' ' || (revoked_at <= now())::text FROM keypal.keys WHERE id = pg_temp.id('gc1')),
          'parent revoked true', 'the child is revoked now by the cascade');
INSERT INTO k SELECT 'g2', key, id FROM keypal_create(owner_id => 'fam5', scopes => '{read}');
INSERT INTO k SELECT 'gc2', key, id FROM keypal_create(owner_id => 'fam5c', scopes => '{read}', parent_id => pg_temp.id('g2'));
UPDATE keypal.keys SET revoked_at = now() + interval '1 hour' WHERE id = pg_temp.id('gc2');
INSERT INTO k SELECT 'g2b', key, id FROM keypal_rotate(pg_temp.id('g2'));
SELECT is((SELECT parent_id FROM keypal.keys WHERE id = pg_temp.id('gc2')), pg_temp.id('g2b'), 'rotation moves a child in its grace to the new key');
INSERT INTO k SELECT 'g3', key, id FROM keypal_create(owner_id => 'fam5', scopes => '{read}');
INSERT INTO k SELECT 'gc3', key, id FROM keypal_create(owner_id => 'fam5c', scopes => '{read}', parent_id => pg_temp.id('g3'));
SELECT keypal_revoke(pg_temp.id('gc3'));
INSERT INTO k SELECT 'g3b', key, id FROM keypal_rotate(pg_temp.id('g3'));
SELECT is((SELECT parent_id FROM keypal.keys WHERE id = pg_temp.id('gc3')), pg_temp.id('g3'), 'and leaves a revoked child under the old key');
-- The probes and kept plans that must read the index, never the table, run with sequential
-- scans off, and with JIT off (a plan that must scan a table anyway would otherwise look
-- costly enough to compile at every call); the kept ones with materializing off too.
SELECT is((SELECT string_agg(p.proname || ' ' || array_to_string(ARRAY(
                 SELECT c FROM unnest(p.proconfig) c WHERE c LIKE 'enable\_%' OR c LIKE 'jit=%' ORDER BY c), ','), '; ' ORDER BY p.proname)
             FROM pg_proc p WHERE p.pronamespace = 'keypal'::regnamespace
              AND p.proname IN ('cascade_revocation', 'check_children', 'move_children', 'revoke_children', 'set_timers')),
          'cascade_revocation enable_nestloop=off,enable_seqscan=off,jit=off; '
          'check_children enable_seqscan=off,jit=off; '
          'move_children enable_seqscan=off,jit=off; '
          'revoke_children enable_hashjoin=off,enable_material=off,enable_mergejoin=off,enable_nestloop=on,enable_seqscan=off,jit=off; '
          'set_timers enable_hashjoin=off,enable_material=off,enable_mergejoin=off,enable_nestloop=on,enable_seqscan=off,jit=off',
          'the probes'' planner settings');
-- How often the UPDATE triggers and the cascade's UPDATE run (this transaction's counts).
SET LOCAL track_functions = 'all';
CREATE FUNCTION pg_temp.calls(f text) RETURNS bigint LANGUAGE sql AS $$
    SELECT coalesce((SELECT calls FROM pg_stat_xact_user_functions WHERE schemaname = 'keypal' AND funcname = f), 0) $$;
CREATE TEMP TABLE calls_before AS SELECT pg_temp.calls('audit_updated_keys') AS audit, pg_temp.calls('revoke_children') AS cascade;
INSERT INTO k SELECT 'lone', key, id FROM keypal_create(owner_id => 'fam4', scopes => '{read}');
SELECT is(keypal_revoke(pg_temp.id('lone')), 1, 'revoke a key without children');
SELECT is(pg_temp.calls('audit_updated_keys') - (SELECT audit FROM calls_before), 1::bigint, 'one UPDATE statement on the keys');
SELECT is(pg_temp.calls('revoke_children') - (SELECT cascade FROM calls_before), 0::bigint, 'no cascade UPDATE');
INSERT INTO k SELECT 'lone2', key, id FROM keypal_create(owner_id => 'fam4', scopes => '{read}');
INSERT INTO k SELECT 'lone3', key, id FROM keypal_rotate(pg_temp.id('lone2'));
SELECT is(pg_temp.calls('audit_updated_keys') - (SELECT audit FROM calls_before), 2::bigint, 'rotating a key without children: one UPDATE statement');
SELECT is(pg_temp.calls('revoke_children') - (SELECT cascade FROM calls_before), 0::bigint, '... and no cascade');
INSERT INTO k SELECT 'pa', key, id FROM keypal_create(owner_id => 'fam4', scopes => '{read}');
INSERT INTO k SELECT 'ch', key, id FROM keypal_create(owner_id => 'fam4', scopes => '{read}', parent_id => pg_temp.id('pa'));
SELECT is(keypal_revoke(pg_temp.id('pa')), 1, 'revoke a parent');
SELECT is(pg_temp.calls('revoke_children') - (SELECT cascade FROM calls_before), 1::bigint, 'its child: one cascade UPDATE');
SELECT is(pg_temp.code(keypal_verify(pg_temp.key('ch'))), 'REVOKED', '... which revokes it');

SELECT * FROM finish();
ROLLBACK;
