-- What a security review found open (issue 7): verify's time basis and schedules, fail-open
-- inputs, parallel plans, ancestors, invariants management functions could break, audit
-- truth, bad input, the entropy floor. Each block names its point.
BEGIN;
SELECT no_plan();

CREATE TEMP TABLE h (label text PRIMARY KEY, key text, id uuid);
CREATE FUNCTION pg_temp.key(l text) RETURNS text LANGUAGE sql AS $$ SELECT key FROM h WHERE label = l $$;
CREATE FUNCTION pg_temp.id(l text) RETURNS uuid LANGUAGE sql AS $$ SELECT id FROM h WHERE label = l $$;
CREATE FUNCTION pg_temp.code(l text, want text DEFAULT NULL) RETURNS text LANGUAGE sql AS $$
    SELECT coalesce(v.error_code, 'VALID') FROM keypal_verify(pg_temp.key(l), want) v $$;

-- 1. Time basis: the current time, not the transaction's start. This transaction began
-- before these deadlines; verify must still see them pass.
INSERT INTO h SELECT 'expires_soon', key, id FROM keypal_create(owner_id => 'h', expires_at => clock_timestamp() + interval '2 seconds');
INSERT INTO h SELECT 'revoke_soon', key, id FROM keypal_create(owner_id => 'h', revoke_at => clock_timestamp() + interval '2 seconds');
INSERT INTO h SELECT 'disable_soon', key, id FROM keypal_create(owner_id => 'h', disable_at => clock_timestamp() + interval '2 seconds');
SELECT is(pg_temp.code('expires_soon'), 'VALID', 'time basis: valid before its expiry');
SELECT pg_sleep(2.2);
SELECT is(pg_temp.code('expires_soon'), 'EXPIRED', 'time basis: expired once the clock passes expires_at, inside an older transaction');
SELECT is(pg_temp.code('revoke_soon'), 'REVOKED', 'time basis: revoke_at passes inside an older transaction');
SELECT is(pg_temp.code('disable_soon'), 'DISABLED', 'time basis: disable_at passes inside an older transaction');

-- 2. A passed revoke_at / disable_at is applied by verify itself, at once.
INSERT INTO h SELECT 'revoke_at', key, id FROM keypal_create(owner_id => 'h', revoke_at => now() - interval '1 hour');
INSERT INTO h SELECT 'disable_at', key, id FROM keypal_create(owner_id => 'h', disable_at => now() - interval '1 hour');
INSERT INTO h SELECT 'both_at', key, id FROM keypal_create(owner_id => 'h', disable_at => now() - interval '1 hour', revoke_at => now() - interval '1 hour');
INSERT INTO h SELECT 'future_at', key, id FROM keypal_create(owner_id => 'h', scopes => '{read}', revoke_at => now() + interval '1 day', disable_at => now() + interval '1 day');
SELECT is(pg_temp.code('revoke_at'), 'REVOKED', 'schedules: a passed revoke_at verifies as REVOKED');
SELECT is(pg_temp.code('disable_at'), 'DISABLED', 'schedules: a passed disable_at verifies as DISABLED');
SELECT is(pg_temp.code('both_at'), 'REVOKED', 'schedules: REVOKED is checked before DISABLED');
SELECT is(pg_temp.code('future_at'), 'VALID', 'schedules: a future revoke_at/disable_at changes nothing yet');
SELECT is((SELECT keypal_check(pg_temp.key('revoke_at'))), false, 'schedules: keypal_check agrees');
SELECT throws_ok(format('SELECT keypal_require(%L)', pg_temp.key('disable_at')), '28000', NULL, 'schedules: keypal_require raises 28000');
SELECT throws_ok(format('SELECT keypal_update(%L, name => %L)', pg_temp.id('revoke_at'), 'x'), '55000', NULL,
                 'schedules: a key past its revoke_at cannot be modified (it is revoked)');
-- Enabling a key past its disable_at clears the schedule: it verifies again.
SELECT is(keypal_enable(pg_temp.id('disable_at')), true, 'schedules: keypal_enable acts on a key past its disable_at');
SELECT is(pg_temp.code('disable_at'), 'VALID', 'schedules: which then verifies again');
SELECT is((SELECT disable_at FROM keypal.keys WHERE id = pg_temp.id('disable_at')), NULL, 'schedules: the passed disable_at is cleared');
SELECT is(keypal_enable(pg_temp.id('disable_at')), false, 'schedules: a second enable changes nothing');
-- An ancestor's passed schedule counts too.
INSERT INTO h SELECT 'sched_parent', key, id FROM keypal_create(owner_id => 'h', scopes => '{read}');
INSERT INTO h SELECT 'sched_child', key, id FROM keypal_create(owner_id => 'h', scopes => '{read}', parent_id => pg_temp.id('sched_parent'));
UPDATE keypal.keys SET disable_at = now() - interval '1 second' WHERE id = pg_temp.id('sched_parent');
SELECT is(pg_temp.code('sched_child'), 'DISABLED', 'schedules: a parent''s passed disable_at disables the child');
SELECT throws_ok(format('SELECT * FROM keypal_create(owner_id => %L, parent_id => %L)', 'h', pg_temp.id('sched_parent')), '55000', NULL,
                 'schedules: no new child under a parent past its disable_at');

-- 3. Fail-open inputs.
INSERT INTO h SELECT 'scoped', key, id FROM keypal_create(owner_id => 'h', scopes => '{read,write}');
SELECT is((SELECT error_code FROM keypal_verify(pg_temp.key('scoped'), scopes => ARRAY[NULL]::text[])), 'INSUFFICIENT_SCOPE',
          'NULL scope: ARRAY[NULL] fails the scope check');
SELECT is((SELECT error_code FROM keypal_verify(pg_temp.key('scoped'), scopes => ARRAY['read', NULL])), 'INSUFFICIENT_SCOPE',
          'NULL scope: a NULL among held scopes still fails');
SELECT is((SELECT keypal_check(pg_temp.key('scoped'), scopes => ARRAY[NULL::text])), false, 'NULL scope: keypal_check false');
SELECT is((SELECT error_code FROM keypal_verify(pg_temp.key('scoped'), scopes => '{read,write}')), NULL, 'held scopes still verify');
SELECT is((SELECT error_code FROM keypal_verify(pg_temp.key('scoped'), scopes => '{}')), NULL, 'an empty scopes array asks for nothing');
SET LOCAL statement_timeout = '5s';
SELECT throws_ok(format('SELECT keypal_verify(%L, scopes => array(SELECT %L || i FROM generate_series(1, 1000000) i))', pg_temp.key('scoped'), 's'),
                 '22023', NULL, 'a million required scopes: refused at once with 22023');
SELECT is((SELECT error_code FROM keypal_verify(pg_temp.key('scoped'), scopes => array(SELECT 's' || i FROM generate_series(1, 1000) i))),
          'INSUFFICIENT_SCOPE', '1000 required scopes: a verdict');
SELECT is((SELECT error_code FROM keypal_verify(repeat('x', 20000000))), 'INVALID_FORMAT', 'a 20 MB key: INVALID_FORMAT, quickly');
SELECT is((SELECT error_code FROM keypal_verify_headers(jsonb_build_object('x-api-key', repeat('y', 5000000)))), 'INVALID_FORMAT',
          'a 5 MB header key: INVALID_FORMAT, quickly');
RESET statement_timeout;

-- 4. Parallel plans: the identity lives in the leader, so keypal_current_* never run in a worker.
SELECT is((SELECT string_agg(proname || '=' || proparallel::text, ',' ORDER BY proname) FROM pg_proc
            WHERE proname IN ('keypal_current_key_id', 'keypal_current_owner', 'keypal_current_org',
                              'keypal_current_scopes', 'keypal_current_has_scope', 'authenticated_key_id')),
          'authenticated_key_id=r,keypal_current_has_scope=r,keypal_current_key_id=r,keypal_current_org=r,keypal_current_owner=r,keypal_current_scopes=r',
          'parallel: the identity readers are PARALLEL RESTRICTED');
CREATE TABLE public.par_rows (owner text, payload text);
INSERT INTO public.par_rows SELECT CASE WHEN i % 2 = 0 THEN 'par_owner' ELSE 'other' END, repeat('p', 50) FROM generate_series(1, 200000) i;
ANALYZE public.par_rows;
INSERT INTO h SELECT 'par', key, id FROM keypal_create(owner_id => 'par_owner', scopes => '{read}');
SELECT valid FROM keypal_authenticate(pg_temp.key('par'), 'read');
SET LOCAL force_parallel_mode = on;
SET LOCAL parallel_setup_cost = 0;
SET LOCAL parallel_tuple_cost = 0;
SET LOCAL min_parallel_table_scan_size = 0;
SET LOCAL max_parallel_workers_per_gather = 2;
SET LOCAL parallel_leader_participation = off;
-- (Top-level queries: a pgTAP call around them would itself rule out a parallel plan.)
CREATE FUNCTION pg_temp.plan(q text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE line text; plan text := '';
BEGIN
    FOR line IN EXECUTE 'EXPLAIN (COSTS OFF) ' || q LOOP plan := plan || line || ' '; END LOOP;
    RETURN plan;
END $$;
SELECT alike(pg_temp.plan($$SELECT count(*) FROM public.par_rows WHERE owner = 'par_owner'$$), '%Gather%',
            'parallel: this setup does run a plain filter in parallel workers');
SELECT count(*) AS par_owner_rows FROM public.par_rows WHERE owner = keypal_current_owner() \gset
SELECT count(*) AS par_scope_rows FROM public.par_rows WHERE keypal_current_has_scope('read') AND owner = 'other' \gset
SELECT is(:par_owner_rows::bigint, 100000::bigint,
          'parallel: a filter on keypal_current_owner() sees the identity under forced parallel plans');
SELECT is(:par_scope_rows::bigint, 100000::bigint, 'parallel: keypal_current_has_scope too');
RESET force_parallel_mode;
RESET parallel_setup_cost;
RESET parallel_tuple_cost;
RESET min_parallel_table_scan_size;
RESET max_parallel_workers_per_gather;
RESET parallel_leader_participation;

-- 5. Ancestors: read as the key is (a parent disabled earlier in the same statement is
-- seen), and hierarchy depth is capped at creation.
INSERT INTO h SELECT 'stmt_parent', key, id FROM keypal_create(owner_id => 'h', scopes => '{read}');
INSERT INTO h SELECT 'stmt_child', key, id FROM keypal_create(owner_id => 'h', scopes => '{read}', parent_id => pg_temp.id('stmt_parent'));
SELECT is((WITH d AS MATERIALIZED (SELECT keypal_disable(pg_temp.id('stmt_parent')) AS changed)
           SELECT v.error_code FROM d, keypal_verify(pg_temp.key('stmt_child')) v WHERE d.changed),
          'DISABLED', 'ancestors: a parent disabled earlier in the same statement is seen');
SELECT is(keypal.max_hierarchy_depth(), 32, 'the hierarchy depth cap is 32 levels');
DO $$
DECLARE
    parent uuid;
    k record;
BEGIN
    FOR i IN 1 .. 32 LOOP
        SELECT * INTO k FROM keypal_create(owner_id => 'deep', scopes => '{read}', parent_id => parent);
        parent := k.id;
    END LOOP;
    INSERT INTO h VALUES ('deepest', k.key, k.id);
END $$;
SELECT is(pg_temp.code('deepest'), 'VALID', 'ancestors: a key 32 levels deep verifies');
SELECT throws_like(format('SELECT * FROM keypal_create(owner_id => %L, parent_id => %L)', 'deep', pg_temp.id('deepest')),
                   '%at most 32 levels%', 'ancestors: a 33rd level is refused, naming the cap');
SELECT throws_ok(format('SELECT * FROM keypal_create(owner_id => %L, parent_id => %L)', 'deep', pg_temp.id('deepest')), '22023', NULL,
                 'ancestors: a 33rd level is 22023');
UPDATE keypal.keys SET enabled = false
 WHERE id = (SELECT id FROM keypal.keys WHERE owner_id = 'deep' AND parent_id IS NULL);
SELECT is(pg_temp.code('deepest'), 'DISABLED', 'ancestors: the root of a 32-level chain is reached');

-- 6. Invariants: rotation keeps children within their parent, update keeps the policy,
-- has_scope answers only for keys that would verify.
INSERT INTO h SELECT 'rot_parent', key, id FROM keypal_create(owner_id => 'h', scopes => '{read,write}');
INSERT INTO h SELECT 'rot_child', key, id FROM keypal_create(owner_id => 'h', scopes => '{write}', parent_id => pg_temp.id('rot_parent'));
SELECT throws_like(format('SELECT * FROM keypal_rotate(%L, scopes => %L)', pg_temp.id('rot_parent'), '{read}'),
                   '%child key%subset%', 'rotate: narrower scopes than a child''s are refused, naming the rule');
SELECT throws_ok(format('SELECT * FROM keypal_rotate(%L, scopes => %L)', pg_temp.id('rot_parent'), '{read}'), '22023', NULL, 'rotate: 22023');
SELECT is(pg_temp.code('rot_parent'), 'VALID', 'rotate: the refused rotation changed nothing');
SELECT lives_ok(format('SELECT * FROM keypal_rotate(%L, scopes => %L)', pg_temp.id('rot_parent'), '{write,admin}'), 'rotate: scopes still covering the child are fine');

SELECT keypal_define_policy('hard:ro', scopes => '{read}', max_ttl => '30d', require_ip => true, max_resources => 1);
INSERT INTO h SELECT 'pol', key, id FROM keypal_create(owner_id => 'h', scopes => '{read}', allowed_ips => '{10.0.0.1}', policy => 'hard:ro');
SELECT throws_like(format('SELECT keypal_update(%L, scopes => %L)', pg_temp.id('pol'), '{read,write}'), '%policy%scopes%', 'update: the policy''s scopes rule holds');
SELECT throws_like(format('SELECT keypal_update(%L, allowed_ips => %L)', pg_temp.id('pol'), '{}'), '%policy%require_ip%', 'update: require_ip holds');
SELECT throws_like(format('SELECT keypal_update(%L, expires_in => %L)', pg_temp.id('pol'), '1y'), '%policy%max_ttl%', 'update: max_ttl holds');
SELECT throws_like(format('SELECT keypal_update(%L, resources => %L)', pg_temp.id('pol'), '{"a:1": ["read"], "a:2": ["read"]}'), '%policy%', 'update: max_resources/scopes hold');
SELECT throws_ok(format('SELECT keypal_update(%L, scopes => %L)', pg_temp.id('pol'), '{read,write}'), '22023', NULL, 'update: policy violations are 22023');
SELECT lives_ok(format('SELECT keypal_update(%L, name => %L)', pg_temp.id('pol'), 'renamed'), 'update: a change within the policy is fine');

INSERT INTO h SELECT 'hs_revoked', key, id FROM keypal_create(owner_id => 'h', scopes => '{read}');
INSERT INTO h SELECT 'hs_disabled', key, id FROM keypal_create(owner_id => 'h', scopes => '{read}');
INSERT INTO h SELECT 'hs_expired', key, id FROM keypal_create(owner_id => 'h', scopes => '{read}');
INSERT INTO h SELECT 'hs_child', key, id FROM keypal_create(owner_id => 'h', scopes => '{read}', parent_id => pg_temp.id('hs_disabled'));
INSERT INTO h SELECT 'hs_live', key, id FROM keypal_create(owner_id => 'h', scopes => '{read}');
SELECT keypal_revoke(pg_temp.id('hs_revoked'));
SELECT keypal_disable(pg_temp.id('hs_disabled'));
UPDATE keypal.keys SET expires_at = now() - interval '1 second' WHERE id = pg_temp.id('hs_expired');
SELECT is((SELECT array_agg(keypal_has_scope(pg_temp.id(l), 'read') ORDER BY l) FROM unnest(ARRAY['hs_child', 'hs_disabled', 'hs_expired', 'hs_live', 'hs_revoked']) l),
          ARRAY[false, false, false, true, false], 'has_scope: false for revoked, disabled, expired keys and children of disabled ones');
SELECT is(keypal_has_any_scope(pg_temp.id('hs_revoked'), '{read}'), false, 'has_any_scope: false for a revoked key');
SELECT is(keypal_has_all_scopes(pg_temp.id('hs_expired'), '{read}'), false, 'has_all_scopes: false for an expired key');
SELECT is(keypal_has_all_scopes(pg_temp.id('hs_live'), '{read}'), true, 'has_all_scopes: true for a live key');
SELECT is(keypal_has_any_scope(pg_temp.id('hs_live'), '{write,read}'), true, 'has_any_scope: true when one is held');
SELECT is(keypal_has_all_scopes(pg_temp.id('hs_live'), '{read,NULL}'), false, 'has_all_scopes: a NULL among them is not held');
SELECT is(keypal_has_all_scopes(pg_temp.id('hs_live'), '{}'), false, 'has_all_scopes: an empty list is false');
SELECT is(keypal_has_scope(gen_random_uuid(), 'read'), false, 'has_scope: false for no such key');

-- 7. Audit truth: role is the real database role, whatever actor claims.
GRANT EXECUTE ON FUNCTION keypal_create(text, text, text, text[], jsonb, text[], jsonb, text, timestamptz, text, text, uuid, text, jsonb, jsonb, text[], text[], text[], text[], timestamptz, timestamptz, text, boolean, text) TO keypal_admin;
SET LOCAL SESSION AUTHORIZATION keypal_admin;
CREATE TEMP TABLE forged AS SELECT id FROM keypal_create(owner_id => 'h', actor => 'alice@example.com');
RESET SESSION AUTHORIZATION;
SELECT results_eq($$SELECT actor, role FROM keypal.audit_log WHERE key_id = (SELECT id FROM forged)$$,
                  $$VALUES ('alice@example.com', 'keypal_admin')$$, 'audit: actor as claimed, role the real session role');
SELECT is((SELECT count(*) FROM keypal.audit_log WHERE role IS NULL OR role = ''), 0::bigint, 'audit: role always filled');
CREATE TEMP TABLE mine AS SELECT id FROM keypal_create(owner_id => 'h', actor => 'bob');
SELECT is((SELECT role FROM keypal.audit_log WHERE key_id = (SELECT id FROM mine)), session_user::text, 'audit: role is session_user');

-- 9. Bad input: clear errors, nothing poisoned.
SELECT throws_ok($$SELECT * FROM keypal_create(owner_id => 'h', expires_in => '5é')$$, '22007', NULL, 'a multibyte duration: 22007, not an internal error');
SELECT throws_ok($$SELECT keypal.parse_duration('1日', 'x')$$, '22007', NULL, 'parse_duration: a multibyte unit, 22007');
SELECT throws_like($$SELECT * FROM keypal_create(owner_id => 'h', rate_limit => '{"requests": 5}')$$, '%rate_limit.window%required%', 'a rate limit without window names the field');
SELECT throws_ok($$SELECT * FROM keypal_create(owner_id => 'h', rate_limit => '{"requests": 5}')$$, '22023', NULL, 'a missing window is 22023, not 22007');
SELECT throws_ok($$SELECT * FROM keypal_create(owner_id => 'h', quota => '{"limit": 9223372036854775807}')$$, '22023', NULL, 'a quota limit near i64::MAX: 22023');
SELECT throws_ok($$SELECT * FROM keypal_create(owner_id => 'h', rate_limit => '{"requests": 9223372036854775807, "window": "1m"}')$$, '22023', NULL, 'rate-limit requests near i64::MAX: 22023');
INSERT INTO h SELECT 'usage', key, id FROM keypal_create(owner_id => 'h', quota => '{"limit": 100}');
SELECT throws_ok(format('SELECT keypal_track_usage(%L, cost => %L)', pg_temp.id('usage'), 'NaN'), '22023', NULL, 'track_usage: NaN cost is 22023');
SELECT throws_ok(format('SELECT keypal_track_usage(%L, cost => %L)', pg_temp.id('usage'), 'Infinity'), '22023', NULL, 'track_usage: Infinity cost is 22023');
SELECT throws_ok(format('SELECT keypal_track_usage(%L, requests => 9223372036854775807)', pg_temp.id('usage')), '22023', NULL, 'track_usage: requests near i64::MAX is 22023');
SELECT throws_ok(format('SELECT keypal_track_usage(%L, tokens => 9223372036854775807)', pg_temp.id('usage')), '22023', NULL, 'track_usage: tokens near i64::MAX is 22023');
SELECT is((SELECT count(*) FROM keypal.usage WHERE key_id = pg_temp.id('usage')), 0::bigint, 'track_usage: refused calls stored nothing');
SELECT lives_ok(format('SELECT keypal_track_usage(%L, cost => 1.5, requests => 2)', pg_temp.id('usage')), 'track_usage: finite values are fine');
SELECT is((SELECT used FROM keypal_usage(pg_temp.id('usage'))), 2::bigint, 'track_usage: counted');

-- 12. Leftovers: the internal bulk revoke refuses to match every key.
CREATE TEMP TABLE live_before AS SELECT count(*) AS n FROM keypal.keys WHERE revoked_at IS NULL;
SELECT throws_ok($$SELECT keypal.revoke_where(NULL, NULL, NULL, NULL, NULL)$$, '22023', NULL, 'revoke_where with no filter is refused');
SELECT is((SELECT count(*) FROM keypal.keys WHERE revoked_at IS NULL), (SELECT n FROM live_before), 'revoke_where: nothing was revoked');

SELECT * FROM finish();
ROLLBACK;
