-- Creating keys: arguments, durations, presets, many, templates, policies, bad input.
BEGIN;
SELECT no_plan();

CREATE TEMP TABLE k AS SELECT * FROM keypal_create(
    owner_id => 'user_123', name => 'ci', description => 'for CI', scopes => '{read,write}',
    resources => '{"project:123": ["deploy"]}', tags => '{ci,prod}', metadata => '{"team": "infra"}',
    expires_in => '30d', org_id => 'org_1', allowed_ips => '{10.0.0.0/8}', blocked_regions => '{ru}');
SELECT is((SELECT count(*) FROM k), 1::bigint, 'keypal_create returns one row');
SELECT ok((SELECT expires_at BETWEEN now() + interval '30 days' - interval '1 second' AND now() + interval '30 days' FROM k), 'expires_in 30d');
SELECT results_eq(
    $$SELECT owner_id, org_id, name, description, scopes, resources, tags, metadata, blocked_regions FROM keypal_get((SELECT id FROM k))$$,
    $$VALUES ('user_123', 'org_1', 'ci', 'for CI', '{read,write}'::text[], '{"project:123": ["deploy"]}'::jsonb, '{ci,prod}'::text[], '{"team": "infra"}'::jsonb, '{RU}'::text[])$$,
    'every argument is stored (regions upper-cased)');
SELECT ok(NOT EXISTS (SELECT 1 FROM keypal_get((SELECT id FROM k)) g WHERE to_jsonb(g) ? 'key_hash'), 'keypal_get never returns the hash');

-- Durations: every short unit, case-insensitive, and interval text.
SELECT is((SELECT expires_at - now() FROM keypal_create(owner_id => 'd', expires_in => u)), want, 'expires_in ' || u)
  FROM (VALUES ('30s', interval '30 seconds'), ('5M', interval '5 minutes'), ('1h', interval '1 hour'),
               ('7d', interval '7 days'), ('2W', interval '14 days'), ('90d', interval '90 days'),
               ('1y', interval '365 days'), ('3 hours', interval '3 hours')) AS t(u, want);
SELECT throws_ok(format('SELECT * FROM keypal_create(owner_id => %L, expires_in => %L)', 'd', x), '22007', NULL, 'bad duration ' || x)
  FROM unnest(ARRAY['soon', '5x', '-1d', '0s', '', '1.5.5h', '99999999999999d']) AS x;
SELECT throws_like($$SELECT * FROM keypal_create(owner_id => 'd', expires_in => 'soon')$$, '%expires_in%', 'duration error names expires_in');
SELECT ok((SELECT expires_at = '2999-01-01'::timestamptz FROM keypal_create(owner_id => 'd', expires_at => '2999-01-01')), 'expires_at');
SELECT throws_ok($$SELECT * FROM keypal_create(owner_id => 'd', expires_at => now() - interval '1 day')$$, '22023', NULL, 'expiry in the past refused');
SELECT throws_ok($$SELECT * FROM keypal_create(owner_id => 'd', expires_in => '1d', expires_at => '2999-01-01')$$, '22023', NULL, 'expires_in and expires_at together refused');

-- Presets.
CREATE TEMP TABLE presets AS
    SELECT 'ro' AS kind, id FROM keypal_create_read_only(owner_id => 'p')
    UNION ALL SELECT 'full', id FROM keypal_create_full_access(owner_id => 'p');
SELECT is((SELECT scopes FROM keypal_get((SELECT id FROM presets WHERE kind = 'ro'))), '{read}'::text[], 'create_read_only: {read}');
SELECT is((SELECT scopes FROM keypal_get((SELECT id FROM presets WHERE kind = 'full'))), '{read,write,admin}'::text[], 'create_full_access: {read,write,admin}');

-- create_many: in order, all or nothing.
CREATE TEMP TABLE many AS
    SELECT c.*, row_number() OVER () AS n
      FROM keypal_create_many('[{"owner_id": "m1", "scopes": ["read"]}, {"ownerId": "m2", "expiresIn": "1d"}, {"owner_id": "m3"}]') c;
SELECT results_eq($$SELECT k.owner_id FROM many m JOIN keypal.keys k USING (id) ORDER BY m.n$$,
    $$VALUES ('m1'), ('m2'), ('m3')$$, 'create_many returns one row per spec, in order (camelCase accepted)');
SELECT is((SELECT count(*) FROM keypal_create_many('[]')), 0::bigint, 'create_many of [] creates nothing');
SELECT throws_like($$SELECT * FROM keypal_create_many('[{"owner_id": "m4"}, {"owner_id": "m5", "scopes": "read"}]')$$,
    '%specs[1].scopes%', 'create_many names the bad element and argument');
SELECT is((SELECT count(*) FROM keypal.keys WHERE owner_id IN ('m4', 'm5')), 0::bigint, 'create_many with a bad element wrote nothing');
SELECT throws_ok($$SELECT * FROM keypal_create_many('{"owner_id": "x"}')$$, '22023', NULL, 'create_many needs an array');
SELECT throws_ok($$SELECT * FROM keypal_create_many(NULL)$$, '22023', NULL, 'create_many of NULL refused');

-- Bad input to every argument: a clear error naming the argument, nothing written.
CREATE TEMP TABLE before AS SELECT count(*) AS n FROM keypal.keys;
SELECT throws_like(sql, '%' || arg || '%', 'bad ' || arg || ' is refused naming it')
  FROM (VALUES
    ('owner_id', $$SELECT * FROM keypal_create()$$),
    ('owner_id', $$SELECT * FROM keypal_create(owner_id => '')$$),
    ('owner_id', $$SELECT * FROM keypal_create(owner_id => repeat('x', 5000))$$),
    ('scopes', $$SELECT * FROM keypal_create(owner_id => 'b', scopes => '{""}')$$),
    ('scopes', $$SELECT * FROM keypal_create(owner_id => 'b', scopes => '{NULL}')$$),
    ('scopes', $$SELECT * FROM keypal_create(owner_id => 'b', scopes => (SELECT array_agg('s' || i) FROM generate_series(1, 5000) i))$$),
    ('resources', $$SELECT * FROM keypal_create(owner_id => 'b', resources => '[]')$$),
    ('resources', $$SELECT * FROM keypal_create(owner_id => 'b', resources => '{"project": ["read"]}')$$),
    ('resources', $$SELECT * FROM keypal_create(owner_id => 'b', resources => '{"project:1": "read"}')$$),
    ('tags', $$SELECT * FROM keypal_create(owner_id => 'b', tags => '{""}')$$),
    ('metadata', $$SELECT * FROM keypal_create(owner_id => 'b', metadata => '[1, 2]')$$),
    ('metadata', $$SELECT * FROM keypal_create(owner_id => 'b', metadata => jsonb_build_object('x', repeat('y', 70000)))$$),
    ('env', $$SELECT * FROM keypal_create(owner_id => 'b', env => '')$$),
    ('parent_id', $$SELECT * FROM keypal_create(owner_id => 'b', parent_id => gen_random_uuid())$$),
    ('policy', $$SELECT * FROM keypal_create(owner_id => 'b', policy => 'no-such-policy')$$),
    ('rate_limit', $$SELECT * FROM keypal_create(owner_id => 'b', rate_limit => '{"requests": -1, "window": "1m"}')$$),
    ('rate_limit', $$SELECT * FROM keypal_create(owner_id => 'b', rate_limit => '"100/m"')$$),
    ('quota', $$SELECT * FROM keypal_create(owner_id => 'b', quota => '{"limit": 10, "period": "fortnight"}')$$),
    ('quota', $$SELECT * FROM keypal_create(owner_id => 'b', quota => '{"period": "day"}')$$),
    ('quota', $$SELECT * FROM keypal_create(owner_id => 'b', quota => '{"limit": 10, "on_exceeded": "explode"}')$$),
    ('allowed_ips', $$SELECT * FROM keypal_create(owner_id => 'b', allowed_ips => '{300.1.1.1}')$$),
    ('blocked_ips', $$SELECT * FROM keypal_create(owner_id => 'b', blocked_ips => '{not-an-ip}')$$),
    ('allowed_regions', $$SELECT * FROM keypal_create(owner_id => 'b', allowed_regions => '{Germany}')$$),
    ('blocked_regions', $$SELECT * FROM keypal_create(owner_id => 'b', blocked_regions => '{1}')$$),
    ('notify_before', $$SELECT * FROM keypal_create(owner_id => 'b', notify_before => 'later')$$),
    ('specs[0].colour', $$SELECT * FROM keypal_create_many('[{"owner_id": "b", "colour": "red"}]')$$),
    ('specs[0].owner_id', $$SELECT * FROM keypal_create_many('[{"owner_id": 42}]')$$),
    ('specs[0].metadata', $$SELECT * FROM keypal_create_many('[{"owner_id": "b", "metadata": "x"}]')$$),
    ('specs[0].expires_at', $$SELECT * FROM keypal_create_many('[{"owner_id": "b", "expires_at": "not a time"}]')$$)
  ) AS t(arg, sql);
SELECT throws_ok($$SELECT * FROM keypal_create(owner_id => 'b', scopes => '{read}', rate_limit => '{"requests": 0, "window": "1m"}')$$, '22023', NULL, 'bad value: 22023');
SELECT throws_ok($$SELECT * FROM keypal_create_many('[{"owner_id": "b", "expires_at": "not a time"}]')$$, '22007', NULL, 'bad timestamp in jsonb: 22007');
SELECT throws_ok($$SELECT * FROM keypal_create(owner_id => 'b', parent_id => gen_random_uuid())$$, 'P0002', NULL, 'unknown parent: P0002');
SELECT is((SELECT count(*) FROM keypal.keys), (SELECT n FROM before), 'no bad create wrote a key');
SELECT is((SELECT count(*) FROM keypal.audit_log WHERE owner_id = 'b'), 0::bigint, 'no bad create wrote an audit row');

-- Templates.
SELECT ok(keypal_define_template('ci', '{"scopes": ["read", "deploy"], "expiresIn": "7d", "tags": ["ci"]}') ? 'expires_in', 'template options normalised');
CREATE TEMP TABLE t1 AS SELECT * FROM keypal_create_from_template('ci', owner_id => 'tpl', name => 'from tpl', overrides => '{"tags": ["ci", "nightly"]}');
SELECT results_eq($$SELECT owner_id, name, scopes, tags FROM keypal_get((SELECT id FROM t1))$$,
    $$VALUES ('tpl', 'from tpl', '{read,deploy}'::text[], '{ci,nightly}'::text[])$$, 'create_from_template applies template, owner, name and overrides');
SELECT ok((SELECT expires_at > now() + interval '6 days' FROM t1), 'template expiry applies');
SELECT results_eq($$SELECT action, context FROM keypal.audit_log WHERE key_id = (SELECT id FROM t1)$$,
    $$VALUES ('created', '{"template": "ci"}'::jsonb)$$, 'its audit row names the template');
SELECT throws_ok($$SELECT * FROM keypal_create_from_template('nope', owner_id => 'x')$$, '22023', NULL, 'unknown template: 22023');
SELECT throws_ok($$SELECT keypal_define_template('bad', '{"scopes": 1}')$$, '22023', NULL, 'bad template options: 22023');
SELECT throws_ok($$SELECT keypal_define_template('', '{}')$$, '22023', NULL, 'template needs a name');

-- Policies: violations raise 22023 naming the rule.
SELECT lives_ok($$SELECT keypal_define_policy('api:readonly', scopes => '{read}', max_ttl => '30d', require_ip => true, max_resources => 1)$$, 'define a policy');
SELECT lives_ok($$SELECT * FROM keypal_create(owner_id => 'pol', scopes => '{read}', expires_in => '7d', allowed_ips => '{10.0.0.1}', policy => 'api:readonly')$$, 'a key within the policy');
SELECT throws_like($$SELECT * FROM keypal_create(owner_id => 'pol', scopes => '{write}', expires_in => '7d', allowed_ips => '{10.0.0.1}', policy => 'api:readonly')$$, '%scopes%', 'policy: scopes rule');
SELECT throws_like($$SELECT * FROM keypal_create(owner_id => 'pol', scopes => '{read}', expires_in => '90d', allowed_ips => '{10.0.0.1}', policy => 'api:readonly')$$, '%max_ttl%', 'policy: max_ttl rule');
-- A policy's max_ttl is the default expiry of a key created without one.
SELECT cmp_ok((SELECT abs(extract(epoch FROM expires_at - (now() + interval '30 days')))
                 FROM keypal_create(owner_id => 'pol', scopes => '{read}', allowed_ips => '{10.0.0.1}', policy => 'api:readonly')),
              '<', 1::numeric, 'policy: max_ttl supplies the default expiry (30 days)');
SELECT throws_like($$SELECT * FROM keypal_create(owner_id => 'pol', scopes => '{read}', expires_in => '7d', policy => 'api:readonly')$$, '%require_ip%', 'policy: require_ip rule');
SELECT throws_ok($$SELECT * FROM keypal_create(owner_id => 'pol', scopes => '{read}', expires_in => '7d', allowed_ips => '{10.0.0.1}', policy => 'api:readonly', resources => '{"a:1": ["read"], "b:2": ["read"]}')$$, '22023', NULL, 'policy: max_resources rule');
SELECT throws_ok($$SELECT keypal_define_policy('p2', max_ttl => 'forever')$$, '22007', NULL, 'policy with bad max_ttl');

-- Environments: prefix per environment, unknown environment refused.
SELECT keypal_configure(environments => '{"live": {"prefix": "sk_live_"}, "test": {"prefix": "sk_test_", "rate_limit": null}}');
SELECT ok((SELECT key LIKE 'sk_live_%' AND env = 'live' FROM keypal_create(owner_id => 'e', env => 'live')), 'live key has the live prefix');
SELECT ok((SELECT key LIKE 'sk_test_%' AND env = 'test' FROM keypal_create(owner_id => 'e', env => 'test')), 'test key has the test prefix');
SELECT throws_ok($$SELECT * FROM keypal_create(owner_id => 'e', env => 'staging')$$, '22023', NULL, 'unknown environment refused');


SELECT throws_ok($$SELECT * FROM keypal_create(owner_id => 's', signing => true)$$, '55000', NULL, 'signing => true needs keypal.signing_secret');

-- Timestamps given to keypal_create keep their moment whatever DateStyle and TimeZone say
-- (CST is US Central to the default abbreviations, not China Standard Time).
SET LOCAL DateStyle = 'SQL, DMY';
SET LOCAL TimeZone = 'Asia/Shanghai';
CREATE TEMP TABLE ds AS SELECT * FROM keypal_create(owner_id => 'ds', expires_at => '2031-03-09 01:59:59.123456+00',
    disable_at => '2030-01-01 00:00:00+00', revoke_at => 'infinity');
SELECT results_eq($$SELECT k.expires_at, k.disable_at, k.revoke_at FROM keypal.keys k WHERE k.id = (SELECT id FROM ds)$$,
    $$VALUES ('2031-03-09 01:59:59.123456+00'::timestamptz, '2030-01-01 00:00:00+00'::timestamptz, 'infinity'::timestamptz)$$,
    'timestamps keep their moment under DateStyle SQL in Asia/Shanghai');
RESET DateStyle;
RESET TimeZone;

-- The table's own check (keypal.key_row_ok) stops what keypal's functions refuse first,
-- when the owner writes rows directly.
SELECT throws_ok($$INSERT INTO keypal.keys (id, key_hash, algorithm, owner_id) VALUES (gen_random_uuid(), '\x01', 'md5', 'x')$$,
    '23514', NULL, 'a row with an unknown algorithm is refused');
SELECT throws_ok($$INSERT INTO keypal.keys (id, key_hash, algorithm, owner_id, metadata) VALUES (gen_random_uuid(), '\x02', 'sha256', 'x', '[]')$$,
    '23514', NULL, 'metadata that is not an object is refused');
SELECT throws_ok($$INSERT INTO keypal.keys (id, key_hash, algorithm, owner_id, resources) VALUES (gen_random_uuid(), '\x03', 'sha512', 'x', '"read"')$$,
    '23514', NULL, 'resources that are not an object are refused');
SELECT throws_ok($$UPDATE keypal.keys SET parent_id = id WHERE id = (SELECT id FROM k)$$,
    '23514', NULL, 'a key cannot be its own parent');
SELECT lives_ok($$INSERT INTO keypal.keys (id, key_hash, algorithm, owner_id, parent_id) VALUES (gen_random_uuid(), '\x04', 'sha512', 'x', (SELECT id FROM k))$$,
    'a well-formed row passes');
SELECT is(keypal.key_row_ok('sha256', gen_random_uuid(), NULL, '{}', NULL), false, 'NULL metadata does not pass');

-- One key is written by a statement of its own (each option a parameter of its column's
-- type), several by one over arrays (jsonb_populate_record): both store every option alike.
SELECT keypal_define_policy('same:rows', scopes => '{read,write}');
CREATE TEMP TABLE same_parent AS SELECT id FROM keypal_create(owner_id => 'same', scopes => '{read,write}', resources => '{"project:1": ["read"]}');
CREATE TEMP TABLE same_spec AS SELECT jsonb_build_object(
    'owner_id', 'same', 'org_id', 'org_s', 'name', 'n', 'description', '', 'scopes', '["read"]'::jsonb,
    'resources', '{"project:1": ["read"]}'::jsonb, 'tags', '["a", "b"]'::jsonb, 'metadata', '{"m": [1, null]}'::jsonb,
    'parent_id', (SELECT id FROM same_parent), 'policy', 'same:rows', 'rate_limit', 'null'::jsonb,
    'quota', '{"limit": 5, "period": "day"}'::jsonb, 'allowed_ips', '["10.0.0.0/8", "::1"]'::jsonb,
    'blocked_ips', '["10.1.0.0/16"]'::jsonb, 'allowed_regions', '["de", "FR"]'::jsonb, 'blocked_regions', '["ru"]'::jsonb,
    'env', NULL, 'expires_in', '1d', 'enabled', false) AS spec;
CREATE TEMP TABLE same_one AS SELECT id FROM keypal_create_many((SELECT jsonb_build_array(spec) FROM same_spec));
CREATE TEMP TABLE same_two AS SELECT id FROM keypal_create_many((SELECT jsonb_build_array(spec, spec) FROM same_spec));
SELECT is((SELECT count(*) FROM same_one) + (SELECT count(*) FROM same_two), 3::bigint, 'one spec, then two');
SELECT is((SELECT count(DISTINCT to_jsonb(k) - '{id,key_hash,created_at,updated_at}'::text[])
             FROM keypal.keys k WHERE k.id IN (SELECT id FROM same_one UNION ALL SELECT id FROM same_two)),
          1::bigint, 'a key made alone and two made together have the same columns');
SELECT is((SELECT to_jsonb(k) - '{id,key_hash,created_at,updated_at,expires_at}'::text[] FROM keypal.keys k WHERE k.id = (SELECT id FROM same_one)),
          jsonb_build_object('owner_id', 'same', 'org_id', 'org_s', 'env', NULL, 'name', 'n', 'description', '',
              'scopes', '["read"]'::jsonb, 'resources', '{"project:1": ["read"]}'::jsonb, 'tags', '["a", "b"]'::jsonb,
              'metadata', '{"m": [1, null]}'::jsonb, 'enabled', false, 'last_used_at', NULL, 'revoked_at', NULL,
              'revoke_reason', NULL, 'revoked_by', NULL, 'rotated_from', NULL, 'rotated_to', NULL,
              'parent_id', (SELECT id FROM same_parent), 'policy', 'same:rows', 'rate_limit', 'null'::jsonb,
              'quota', '{"limit": 5, "period": "day", "on_exceeded": "block"}'::jsonb, 'allowed_ips', '["10.0.0.0/8", "::1"]'::jsonb,
              'blocked_ips', '["10.1.0.0/16"]'::jsonb, 'allowed_regions', '["DE", "FR"]'::jsonb,
              'blocked_regions', '["RU"]'::jsonb, 'disable_at', NULL, 'revoke_at', NULL, 'notify_before', NULL,
              'signing', false, 'algorithm', 'sha256'),
          'and they are the options given');
-- and the same for a spec of defaults and JSON nulls (no list, no JSON column: $1 NULL)
CREATE TEMP TABLE bare_spec AS SELECT '{"owner_id": "bare", "name": null, "org_id": null, "quota": null, "description": null}'::jsonb AS spec;
CREATE TEMP TABLE bare_one AS SELECT id FROM keypal_create_many((SELECT jsonb_build_array(spec) FROM bare_spec));
CREATE TEMP TABLE bare_two AS SELECT id FROM keypal_create_many((SELECT jsonb_build_array(spec, spec) FROM bare_spec));
SELECT is((SELECT count(DISTINCT to_jsonb(k) - '{id,key_hash,created_at,updated_at}'::text[])
             FROM keypal.keys k WHERE k.id IN (SELECT id FROM bare_one UNION ALL SELECT id FROM bare_two)),
          1::bigint, 'defaults and JSON nulls: alone and together alike');
SELECT is((SELECT to_jsonb(k) - '{id,key_hash,created_at,updated_at}'::text[] FROM keypal.keys k WHERE k.id = (SELECT id FROM bare_one)),
          jsonb_build_object('owner_id', 'bare', 'org_id', NULL, 'env', NULL, 'name', NULL, 'description', NULL,
              'scopes', '[]'::jsonb, 'resources', '{}'::jsonb, 'tags', '[]'::jsonb, 'metadata', '{}'::jsonb,
              'enabled', true, 'expires_at', NULL, 'last_used_at', NULL, 'revoked_at', NULL, 'revoke_reason', NULL,
              'revoked_by', NULL, 'rotated_from', NULL, 'rotated_to', NULL, 'parent_id', NULL, 'policy', NULL,
              'rate_limit', NULL, 'quota', NULL, 'allowed_ips', '[]'::jsonb, 'blocked_ips', '[]'::jsonb,
              'allowed_regions', '[]'::jsonb, 'blocked_regions', '[]'::jsonb, 'disable_at', NULL, 'revoke_at', NULL,
              'notify_before', NULL, 'signing', false, 'algorithm', 'sha256'),
          'and they are the defaults');
SELECT is((SELECT count(*) FROM keypal.keys WHERE id IN (SELECT id FROM bare_one UNION ALL SELECT id FROM bare_two)
             AND rate_limit IS NULL AND quota IS NULL AND name IS NULL),
          3::bigint, 'a quota of JSON null and no rate_limit are SQL NULL, by both');
SELECT is((SELECT string_agg(coalesce(rate_limit::text, 'NULL'), ' ') FROM keypal.keys
            WHERE id IN (SELECT id FROM same_one UNION ALL SELECT id FROM same_two)),
          'null null null', 'a rate_limit of JSON null is kept as JSON null (no limit), by both');

SELECT * FROM finish();
ROLLBACK;
