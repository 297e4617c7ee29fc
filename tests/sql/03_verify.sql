-- keypal_verify and its family: every error code of SPEC §4, in order; §5's SQLSTATEs.
BEGIN;
SELECT no_plan();


SELECT keypal_configure(prefix => 'sk_', environments => '{"live": {"prefix": "sk_live_"}, "test": {"prefix": "sk_test_"}}');
CREATE TEMP TABLE k (label text PRIMARY KEY, key text, id uuid);
INSERT INTO k SELECT 'plain', key, id FROM keypal_create(owner_id => 'u1', org_id => 'o1', scopes => '{read,write}', resources => '{"project:1": ["deploy"]}', tags => '{t}', metadata => '{"m": 1}', name => 'plain');
INSERT INTO k SELECT 'live', key, id FROM keypal_create(owner_id => 'u1', env => 'live', scopes => '{read}');
INSERT INTO k SELECT 'test', key, id FROM keypal_create(owner_id => 'u1', env => 'test', scopes => '{read}');
INSERT INTO k SELECT 'ips', key, id FROM keypal_create(owner_id => 'u1', scopes => '{read}', allowed_ips => '{192.168.1.0/24,2001:db8::/32}', blocked_ips => '{192.168.1.66}');
INSERT INTO k SELECT 'blockonly', key, id FROM keypal_create(owner_id => 'u1', blocked_ips => '{10.0.0.0/8}');
INSERT INTO k SELECT 'regions', key, id FROM keypal_create(owner_id => 'u1', scopes => '{read}', allowed_regions => '{de,fr}');
INSERT INTO k SELECT 'noregion', key, id FROM keypal_create(owner_id => 'u1', blocked_regions => '{ru}');
INSERT INTO k SELECT 'star', key, id FROM keypal_create(owner_id => 'u1', scopes => '{*}');
INSERT INTO k SELECT 'revoked', key, id FROM keypal_create(owner_id => 'u1');
INSERT INTO k SELECT 'disabled', key, id FROM keypal_create(owner_id => 'u1');
INSERT INTO k SELECT 'expired', key, id FROM keypal_create(owner_id => 'u1', env => 'live');
SELECT keypal_revoke((SELECT id FROM k WHERE label = 'revoked'));
SELECT keypal_disable((SELECT id FROM k WHERE label = 'disabled'));
UPDATE keypal.keys SET expires_at = now() - interval '1 second' WHERE id = (SELECT id FROM k WHERE label = 'expired');
CREATE FUNCTION pg_temp.key(l text) RETURNS text LANGUAGE sql AS $$ SELECT key FROM k WHERE label = l $$;
CREATE FUNCTION pg_temp.code(r keypal.verify_result) RETURNS text LANGUAGE sql AS $$ SELECT coalesce(r.error_code, 'VALID') $$;

-- A valid key returns its identity.
SELECT results_eq(
    $$SELECT valid, error_code, owner_id, org_id, name, scopes, tags, metadata, rate_limited FROM keypal_verify(pg_temp.key('plain'), 'read')$$,
    $$VALUES (true, NULL::text, 'u1', 'o1', 'plain', '{read,write}'::text[], '{t}'::text[], '{"m": 1}'::jsonb, false)$$,
    'a valid verify returns the key''s identity');
SELECT is((SELECT key_id FROM keypal_verify(pg_temp.key('plain'))), (SELECT id FROM k WHERE label = 'plain'), 'key_id');

-- Every error code, each with its message.
SELECT is(pg_temp.code(keypal_verify(NULL)), 'MISSING_KEY', 'NULL key: MISSING_KEY');
SELECT is(pg_temp.code(keypal_verify('')), 'MISSING_KEY', 'empty key: MISSING_KEY');
SELECT is(pg_temp.code(keypal_verify('Bearer ')), 'MISSING_KEY', 'only Bearer: MISSING_KEY');
SELECT is(pg_temp.code(keypal_verify('   ')), 'MISSING_KEY', 'blank: MISSING_KEY');
SELECT is(pg_temp.code(keypal_verify('pk_' || repeat('a', 32))), 'INVALID_FORMAT', 'unknown prefix: INVALID_FORMAT');
SELECT is(pg_temp.code(keypal_verify('sk_abc')), 'INVALID_FORMAT', 'too short: INVALID_FORMAT');
SELECT is(pg_temp.code(keypal_verify('sk_' || repeat('-', 32))), 'INVALID_FORMAT', 'bad characters: INVALID_FORMAT');
SELECT is(pg_temp.code(keypal_verify(repeat('x', 5000))), 'INVALID_FORMAT', 'huge key: INVALID_FORMAT');
SELECT is(pg_temp.code(keypal_verify('sk_' || repeat('a', 32))), 'INVALID_KEY', 'well-formed unknown key: INVALID_KEY');
SELECT is(pg_temp.code(keypal_verify('sk_live_' || repeat('a', 32))), 'INVALID_KEY', 'env prefix, unknown key: INVALID_KEY');
SELECT is(pg_temp.code(keypal_verify(pg_temp.key('revoked'))), 'REVOKED', 'revoked: REVOKED');
SELECT is((keypal_verify(pg_temp.key('revoked'))).error, 'API key has been revoked', 'keypal''s wording');
SELECT is(pg_temp.code(keypal_verify(pg_temp.key('disabled'))), 'DISABLED', 'disabled: DISABLED');
SELECT is(pg_temp.code(keypal_verify(pg_temp.key('expired'))), 'EXPIRED', 'expired: EXPIRED');
SELECT is(pg_temp.code(keypal_verify(pg_temp.key('test'), env => 'live')), 'ENV_MISMATCH', 'test key, live wanted: ENV_MISMATCH');
SELECT is(pg_temp.code(keypal_verify(pg_temp.key('plain'), env => 'live')), 'ENV_MISMATCH', 'key without env, live wanted: ENV_MISMATCH');
SELECT is(pg_temp.code(keypal_verify(pg_temp.key('live'), env => 'live')), 'VALID', 'live key, live wanted: valid');
SELECT is((keypal_verify(pg_temp.key('live'))).env, 'live', 'env reported');
SELECT is(pg_temp.code(keypal_verify(pg_temp.key('ips'))), 'IP_NOT_ALLOWED', 'allow list, no ip: IP_NOT_ALLOWED');
SELECT is(pg_temp.code(keypal_verify(pg_temp.key('ips'), ip => '10.1.1.1')), 'IP_NOT_ALLOWED', 'ip outside allow list');
SELECT is(pg_temp.code(keypal_verify(pg_temp.key('ips'), ip => '192.168.1.66')), 'IP_NOT_ALLOWED', 'ip on block list');
SELECT is(pg_temp.code(keypal_verify(pg_temp.key('ips'), ip => '192.168.1.7')), 'VALID', 'ip inside allow list');
SELECT is(pg_temp.code(keypal_verify(pg_temp.key('ips'), ip => '2001:db8::1')), 'VALID', 'IPv6 inside allow list');
SELECT is(pg_temp.code(keypal_verify(pg_temp.key('ips'), ip => '2001:db9::1')), 'IP_NOT_ALLOWED', 'IPv6 outside allow list');
SELECT is(pg_temp.code(keypal_verify(pg_temp.key('blockonly'))), 'VALID', 'block list only, no ip: valid');
SELECT is(pg_temp.code(keypal_verify(pg_temp.key('blockonly'), ip => '10.9.9.9')), 'IP_NOT_ALLOWED', 'blocked ip');
SELECT is(pg_temp.code(keypal_verify(pg_temp.key('regions'))), 'REGION_NOT_ALLOWED', 'allowed regions, no country: REGION_NOT_ALLOWED');
SELECT is(pg_temp.code(keypal_verify(pg_temp.key('regions'), country => 'US')), 'REGION_NOT_ALLOWED', 'country outside allowed regions');
SELECT is(pg_temp.code(keypal_verify(pg_temp.key('regions'), country => 'de')), 'VALID', 'allowed country (any case)');
SELECT is(pg_temp.code(keypal_verify(pg_temp.key('noregion'), country => 'RU')), 'REGION_NOT_ALLOWED', 'blocked country');
SELECT is(pg_temp.code(keypal_verify(pg_temp.key('plain'), 'admin')), 'INSUFFICIENT_SCOPE', 'missing scope: INSUFFICIENT_SCOPE');
SELECT is(pg_temp.code(keypal_verify(pg_temp.key('plain'), scopes => '{read,write}')), 'VALID', 'all of scopes held');
SELECT is(pg_temp.code(keypal_verify(pg_temp.key('plain'), scopes => '{read,admin}')), 'INSUFFICIENT_SCOPE', 'one of scopes missing');
SELECT is(pg_temp.code(keypal_verify(pg_temp.key('plain'), 'deploy')), 'INSUFFICIENT_SCOPE', 'resource scope without resource');
SELECT is(pg_temp.code(keypal_verify(pg_temp.key('plain'), 'deploy', resource => 'project:1')), 'VALID', 'resource scope on its resource');
SELECT is(pg_temp.code(keypal_verify(pg_temp.key('plain'), 'deploy', resource => 'project:2')), 'INSUFFICIENT_SCOPE', 'resource scope on another resource');
SELECT is(pg_temp.code(keypal_verify(pg_temp.key('plain'), 'read', resource => 'project:2')), 'VALID', 'global scope satisfies any resource');
SELECT is(pg_temp.code(keypal_verify(pg_temp.key('star'), 'anything', resource => 'x:1')), 'VALID', '* grants everything');

-- The order of the checks (SPEC §4).
UPDATE keypal.keys SET expires_at = now() - interval '1 second', enabled = false WHERE id = (SELECT id FROM k WHERE label = 'revoked');
SELECT is(pg_temp.code(keypal_verify(pg_temp.key('revoked'))), 'REVOKED', 'revoked+disabled+expired: REVOKED first');
UPDATE keypal.keys SET expires_at = now() - interval '1 second' WHERE id = (SELECT id FROM k WHERE label = 'disabled');
SELECT is(pg_temp.code(keypal_verify(pg_temp.key('disabled'))), 'DISABLED', 'disabled+expired: DISABLED before EXPIRED');
SELECT is(pg_temp.code(keypal_verify(pg_temp.key('expired'), env => 'test')), 'EXPIRED', 'expired+env: EXPIRED before ENV_MISMATCH');
SELECT is(pg_temp.code(keypal_verify(pg_temp.key('test'), env => 'live', ip => '1.1.1.1', scope => 'admin')), 'ENV_MISMATCH', 'env before ip and scope');
SELECT is(pg_temp.code(keypal_verify(pg_temp.key('ips'), ip => '1.1.1.1', scope => 'admin')), 'IP_NOT_ALLOWED', 'ip before scope');
SELECT is(pg_temp.code(keypal_verify(pg_temp.key('regions'), country => 'US', scope => 'admin')), 'REGION_NOT_ALLOWED', 'region before scope');
SELECT is((SELECT count(*) FROM keypal_verify(pg_temp.key('revoked')) WHERE key_id IS NULL AND owner_id IS NULL), 1::bigint, 'a failed verify reveals nothing about the key');

-- Bearer prefix and surrounding whitespace are ignored.
SELECT is(pg_temp.code(keypal_verify('Bearer ' || pg_temp.key('plain'))), 'VALID', 'Bearer prefix ignored');
SELECT is(pg_temp.code(keypal_verify(' bearer  ' || pg_temp.key('plain') || ' ')), 'VALID', 'bearer any case, whitespace trimmed');

-- verify_many: one result per key, in order.
SELECT results_eq(
    $$SELECT coalesce(error_code, 'VALID') FROM keypal_verify_many(ARRAY[pg_temp.key('plain'), NULL, pg_temp.key('revoked'), 'sk_' || repeat('b', 32), pg_temp.key('live')], 'read')$$,
    $$VALUES ('VALID'), ('MISSING_KEY'), ('REVOKED'), ('INVALID_KEY'), ('VALID')$$,
    'verify_many keeps order');
SELECT throws_ok($$SELECT * FROM keypal_verify_many(array_fill('x'::text, ARRAY[1001]))$$, '22023', NULL, 'verify_many of more than 1000 keys refused');

-- verify_headers: Authorization (Bearer) then X-API-Key, case-insensitive, trimmed.
SELECT is(pg_temp.code(keypal_verify_headers(jsonb_build_object('Authorization', 'Bearer ' || pg_temp.key('plain')), 'read')), 'VALID', 'Authorization: Bearer');
SELECT is(pg_temp.code(keypal_verify_headers(jsonb_build_object('X-API-KEY', ' ' || pg_temp.key('plain') || ' '))), 'VALID', 'X-API-Key, any case, trimmed');
SELECT is(pg_temp.code(keypal_verify_headers(jsonb_build_object('authorization', 'Bearer ' || pg_temp.key('revoked'), 'x-api-key', pg_temp.key('plain')))), 'REVOKED', 'Authorization wins over X-API-Key');
SELECT is(pg_temp.code(keypal_verify_headers('{"accept": "*/*"}')), 'MISSING_KEY', 'no key header: MISSING_KEY');
SELECT is(pg_temp.code(keypal_verify_headers(NULL)), 'MISSING_KEY', 'NULL headers: MISSING_KEY');

-- check and require.
SELECT ok(keypal_check(pg_temp.key('plain'), 'read'), 'check: true');
SELECT ok(NOT keypal_check(pg_temp.key('plain'), 'admin'), 'check: false');
SELECT is((keypal_require(pg_temp.key('plain'), 'read')).owner_id, 'u1', 'require returns the result');
SELECT is(tap.err(format('SELECT keypal_require(%L)', e.key)), e.want, 'require: ' || e.want)
  FROM (VALUES (NULL, '28000 MISSING_KEY'), ('zz', '28000 INVALID_FORMAT'), ('sk_' || repeat('a', 32), '28000 INVALID_KEY'),
               (pg_temp.key('revoked'), '28000 REVOKED'), (pg_temp.key('disabled'), '28000 DISABLED'),
               (pg_temp.key('expired'), '28000 EXPIRED')) AS e(key, want);
SELECT is(tap.err(format('SELECT keypal_require(%L, env => %L)', pg_temp.key('test'), 'live')), '42501 ENV_MISMATCH', 'require: 42501 ENV_MISMATCH');
SELECT is(tap.err(format('SELECT keypal_require(%L)', pg_temp.key('ips'))), '42501 IP_NOT_ALLOWED', 'require: 42501 IP_NOT_ALLOWED');
SELECT is(tap.err(format('SELECT keypal_require(%L)', pg_temp.key('regions'))), '42501 REGION_NOT_ALLOWED', 'require: 42501 REGION_NOT_ALLOWED');
SELECT is(tap.err(format('SELECT keypal_require(%L, %L)', pg_temp.key('plain'), 'admin')), '42501 INSUFFICIENT_SCOPE the key does not hold scope "admin"', 'require: 42501 INSUFFICIENT_SCOPE, the scope missing in HINT');
SELECT ok(tap.err(format('SELECT keypal_require(%L)', pg_temp.key('revoked'))) NOT LIKE '%' || pg_temp.key('revoked') || '%', 'the error does not echo the key');

-- last_used_at is recorded on a valid verify only (in shared memory: key_info and
-- keypal_get report it at once; the flush worker writes it behind, tests/shell/no_writes.t).
SELECT ok((SELECT last_used_at BETWEEN now() AND clock_timestamp() FROM keypal.key_info WHERE id = (SELECT id FROM k WHERE label = 'plain')), 'valid verify records last_used_at');
SELECT is((SELECT last_used_at FROM keypal.key_info WHERE id = (SELECT id FROM k WHERE label = 'disabled')), NULL, 'failed verify does not');
SELECT is((SELECT last_used_at FROM keypal.keys WHERE id = (SELECT id FROM k WHERE label = 'plain')), NULL, 'verify itself writes nothing to keypal.keys');
SELECT is((SELECT count(*) FROM keypal.audit_log WHERE key_id = (SELECT id FROM k WHERE label = 'plain') AND action = 'updated'), 0::bigint, 'last_used_at writes are not audited as updates');

-- keypal_stats(): verifies since server start by outcome (server-wide: compare deltas).
CREATE TEMP TABLE s0 AS SELECT * FROM keypal_stats();
SELECT is((SELECT count(*) FILTER (WHERE (keypal_verify(pg_temp.key('plain'))).valid) FROM generate_series(1, 3)), 3::bigint, 'three valid verifies');
SELECT is((keypal_verify(pg_temp.key('revoked'))).error_code, 'REVOKED', 'a revoked one');
SELECT is((keypal_verify('')).error_code, 'MISSING_KEY', 'a missing one');
SELECT results_eq(
    $$SELECT s.name, s.value - s0.value FROM keypal_stats() s JOIN s0 USING (name)
       WHERE s.name IN ('verifies_valid', 'verifies_revoked', 'verifies_missing_key', 'verifies_total', 'verifies_expired')
       ORDER BY 1$$,
    $$VALUES ('verifies_expired', 0::bigint), ('verifies_missing_key', 1), ('verifies_revoked', 1), ('verifies_total', 5), ('verifies_valid', 3)$$,
    'keypal_stats counts verifies by outcome');
SELECT is((SELECT count(*) FROM keypal_stats() WHERE name LIKE 'verifies\_%'), 14::bigint, 'a counter for valid, each of the 12 codes, and the total');
SELECT ok((SELECT value FROM keypal_stats() WHERE name = 'shared_bytes') >= (SELECT value FROM keypal_stats() WHERE name = 'shared_entries') * 400,
          'and the shared entries in use with their bytes');

SELECT * FROM finish();
ROLLBACK;
