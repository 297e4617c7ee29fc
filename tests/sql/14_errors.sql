-- Errors that teach (issue 11): each says what was wrong and what to do. And the salt
-- rotation procedure docs/USAGE.md gives.
BEGIN;
SELECT no_plan();

-- tap.diag(sql): 'SQLSTATE | message | detail | hint' of the error sql raises.
CREATE FUNCTION pg_temp.diag(sql text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE st text; msg text; det text; hint text;
BEGIN
    EXECUTE sql;
    RETURN 'no error';
EXCEPTION WHEN others THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT, det = PG_EXCEPTION_DETAIL, hint = PG_EXCEPTION_HINT;
    RETURN concat_ws(' | ', st, msg, det, hint);
END $$;

CREATE TEMP TABLE k AS SELECT * FROM keypal_create(owner_id => 'errors', scopes => '{read}', resources => '{"project:1": ["write"]}');

-- The missing scope is named (in the HINT: DETAIL holds the code, SPEC §5).
SELECT is(pg_temp.diag(format('SELECT keypal_require(%L, %L)', (SELECT key FROM k), 'admin')),
          '42501 | Insufficient scope | INSUFFICIENT_SCOPE | the key does not hold scope "admin"',
          'INSUFFICIENT_SCOPE names the scope missing');
SELECT is(pg_temp.diag(format('SELECT keypal_require(%L, scopes => %L, resource => %L)', (SELECT key FROM k), '{read,write,deploy}', 'project:1')),
          '42501 | Insufficient scope | INSUFFICIENT_SCOPE | the key does not hold scope "deploy" (globally or on "project:1")',
          'the first one missing of several, with the resource asked about');

-- Unknown fields list the valid ones.
SELECT matches(pg_temp.diag($$SELECT keypal_create(owner_id => 'e', rate_limit => '{"requests": 5, "window": "1m", "burst": 9}')$$),
               '^22023 \| invalid rate_limit: unknown field "burst" \(a rate limit has requests and window\)', 'rate_limit: the valid fields');
SELECT matches(pg_temp.diag($$SELECT keypal_create(owner_id => 'e', quota => '{"limit": 5, "reset": "monthly"}')$$),
               '^22023 \| invalid quota: unknown field "reset" \(a quota has limit, period and on_exceeded\)', 'quota: the valid fields');

-- A NULL id: a missing field, 22023 (SPEC §5), "is required".
SELECT matches(pg_temp.diag('SELECT keypal_revoke(NULL)'), '^22023 \| invalid id: is required', 'keypal_revoke(NULL): 22023');
SELECT matches(pg_temp.diag('SELECT keypal_get(NULL)'), '^22023 \| invalid id: is required', 'keypal_get(NULL): 22023');
SELECT matches(pg_temp.diag('SELECT keypal_rotate(NULL)'), '^22023 \| invalid id: is required', 'keypal_rotate(NULL): 22023');
SELECT matches(pg_temp.diag('SELECT keypal_usage(NULL)'), '^22023 \| invalid id: is required', 'keypal_usage(NULL): 22023');
SELECT matches(pg_temp.diag(format('SELECT keypal_revoke(%L)', gen_random_uuid())), '^P0002 \| KEY_NOT_FOUND', 'an unknown id is still P0002');
SELECT matches(pg_temp.diag('SELECT keypal_disable_webhook(NULL)'), '^22023 \| invalid id: is required', 'a webhook function with a NULL id: 22023 too');
SELECT is(pg_temp.diag($$SELECT keypal_create(owner_id => 'e', expires_in => '.5')$$),
          '22007 | invalid duration for expires_in: ''.5'' has no unit |  | add a unit: 30s, 5m, 1h, 7d, 2w or 1y', 'a bare fraction too');
SELECT matches(pg_temp.diag($$SELECT keypal_create(owner_id => 'e', expires_in => '$$ || repeat('9', 140000) || $$')$$), '^22007', 'a huge bare number: 22007, not an overflow');

-- Durations: a bare number says to add a unit; templates are checked when defined.
SELECT is(pg_temp.diag($$SELECT keypal_create(owner_id => 'e', expires_in => '30')$$),
          '22007 | invalid duration for expires_in: ''30'' has no unit |  | add a unit: 30s, 5m, 1h, 7d, 2w or 1y',
          'a bare number: 22007 with the hint to add a unit');
SELECT is((SELECT expires_at > now() + interval '29 days' FROM keypal_create(owner_id => 'e', expires_in => '30d')), true, '30d is 30 days');
SELECT matches(pg_temp.diag($$SELECT keypal_define_template('forever', '{"expires_in": "forever"}')$$),
               '^22007 \| invalid duration for options.expires_in', 'a template with a bad duration is refused when defined');
SELECT matches(pg_temp.diag($$SELECT keypal_define_template('bad-policy', '{"policy": "no such"}')$$),
               '^22023 \| invalid options.policy: no policy named', 'and one naming a policy that does not exist');
SELECT is((SELECT count(*) FROM keypal.templates WHERE name IN ('forever', 'bad-policy')), 0::bigint, 'neither is written');

-- Environments: env and default_env must be configured ones.
SELECT keypal_configure(environments => '{"live": {"prefix": "sk_live_"}, "test": {"prefix": "sk_test_"}}');
SELECT matches(pg_temp.diag($$SELECT keypal_create(owner_id => 'e', env => 'staging')$$),
               '^22023 \| invalid env: no environment named ''staging'' \(configured: live, test\)', 'create: an unknown env');
SELECT matches(pg_temp.diag($$SELECT keypal_define_template('staging', '{"env": "staging"}')$$),
               '^22023 \| invalid options.env: no environment named ''staging''', 'a template: an unknown env');
SELECT matches(pg_temp.diag($$SELECT keypal_import('[{"id": "6f9619ff-8b86-d011-b42d-00c04fc964ff", "owner_id": "e", "env": "live",
                                                       "key_hash": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"},
                                                      {"id": "6f9619ff-8b86-d011-b42d-00c04fc964fe", "owner_id": "e", "env": "staging",
                                                       "key_hash": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a07"}]')$$),
               '^22023 \| invalid data\[1\]\.env: no environment named ''staging'' \(configured: live, test\)', 'an import: the record with an unknown env');
SELECT matches(pg_temp.diag($$SELECT keypal_configure(default_env => 'staging')$$),
               '^22023 \| invalid default_env: no environment named', 'configure: an unknown default_env');

-- keypal_configure() with no argument only reads.
SELECT keypal_configure(prefix => '');
CREATE TEMP TABLE s0 AS SELECT xmin::text AS x, updated_at FROM keypal.settings;
SELECT keypal_configure();
SELECT is((SELECT (xmin::text, updated_at) FROM keypal.settings), (SELECT (x, updated_at) FROM s0), 'keypal_configure() writes nothing');
SELECT is((keypal_configure())->>'prefix', '', 'and answers the settings');

-- keypal_usage: no quota, no "remaining".
SELECT is((SELECT ("limit", remaining) FROM keypal_usage((SELECT id FROM k))), (NULL::bigint, NULL::bigint),
          'a key without a quota: limit and remaining are NULL');
CREATE TEMP TABLE q AS SELECT id FROM keypal_create(owner_id => 'e', quota => '{"limit": 10}');
SELECT is((SELECT remaining FROM keypal_usage((SELECT id FROM q))), 10::bigint, 'with a quota: what is left');

-- keypal_analyze: no advice about disuse longer than the key has lived.
SELECT ok(NOT (keypal_analyze((SELECT id FROM k))->>'recommendations') LIKE '%90 days%',
          'a key seconds old is not "not used for 90 days"');
CREATE TEMP TABLE adm AS SELECT id FROM keypal_create(owner_id => 'e', scopes => '{admin}');
SELECT ok(NOT (keypal_analyze((SELECT id FROM adm))->>'recommendations') LIKE '%unused for 30 days%',
          'nor an admin key "unused for 30 days"');

-- Salt rotation (docs/USAGE.md): keys made under the old salt verify while it is
-- keypal.previous_salt, and stop when it is cleared; keys made after use the new salt.
SET LOCAL keypal.salt = 'old salt';
CREATE TEMP TABLE old_key AS SELECT key FROM keypal_create(owner_id => 'salted', env => 'live');
SET LOCAL keypal.salt = 'new salt';
SELECT is((keypal_verify((SELECT key FROM old_key))).valid, false, 'after the salt changes, an old key does not verify');
SET LOCAL keypal.previous_salt = 'old salt';
SELECT is((keypal_verify((SELECT key FROM old_key))).valid, true, 'with the old salt as previous_salt, it does');
CREATE TEMP TABLE new_key AS SELECT key FROM keypal_create(owner_id => 'salted', env => 'live');
SELECT is((keypal_verify((SELECT key FROM new_key))).valid, true, 'a key made now verifies');
RESET keypal.previous_salt;
SELECT is((keypal_verify((SELECT key FROM new_key))).valid, true, 'under the new salt alone');
SELECT is((keypal_verify((SELECT key FROM old_key))).valid, false, 'and once previous_salt is cleared, the old key stops');

SELECT * FROM finish();
ROLLBACK;
