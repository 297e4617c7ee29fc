-- keypal_analyze on constructed usage histories.
BEGIN;
SELECT no_plan();

CREATE TEMP TABLE k (label text PRIMARY KEY, id uuid);
CREATE FUNCTION pg_temp.id(l text) RETURNS uuid LANGUAGE sql AS $$ SELECT id FROM k WHERE label = l $$;

-- A risky key with no traffic, made 120 days ago.
INSERT INTO k SELECT 'risky', id FROM keypal_create(owner_id => 'an', scopes => '{admin}');
UPDATE keypal.keys SET created_at = now() - interval '120 days' WHERE id = pg_temp.id('risky');
SELECT results_eq($$SELECT r->>'usage_pattern', (r->>'security_score')::int, jsonb_array_length(r->'recommendations') FROM keypal_analyze(pg_temp.id('risky')) r$$,
    $$VALUES ('unused', 10, 6)$$, 'admin, never expires, no IP rule, no limit, unused: score 10, six recommendations');

-- A careful key used in office hours, mostly on one endpoint.
INSERT INTO k SELECT 'office', id FROM keypal_create(owner_id => 'an', env => NULL, scopes => '{read}', expires_in => '30d',
                                                     allowed_ips => '{10.0.0.0/8}', rate_limit => '{"requests": 100, "window": "1m"}');
UPDATE keypal.keys SET last_used_at = now() WHERE id = pg_temp.id('office');
INSERT INTO keypal.usage (key_id, hour, endpoint, requests)
SELECT pg_temp.id('office'), date_trunc('day', now(), 'UTC') - d * interval '1 day' + h * interval '1 hour',
       CASE WHEN h % 2 = 0 THEN '/api/reports' ELSE '/api/users' END, CASE WHEN h % 2 = 0 THEN 20 ELSE 5 END
  FROM generate_series(1, 25) d, generate_series(9, 16) h;
SELECT results_eq($$SELECT r->>'usage_pattern', (r->>'security_score')::int, r->'recommendations', r->>'suggested_name', r->'top_endpoints' FROM keypal_analyze(pg_temp.id('office')) r$$,
    $$VALUES ('business_hours', 100, '[]'::jsonb, 'read-only-reports-key', '["/api/reports", "/api/users"]'::jsonb)$$,
    'office-hours key: business_hours, score 100, named for its scope and top endpoint');
SELECT is((SELECT r->'peak_hours' FROM keypal_analyze(pg_temp.id('office')) r), '[10, 12, 14]'::jsonb, 'peak hours (UTC), busiest first');

-- A key hit by one burst.
INSERT INTO k SELECT 'burst', id FROM keypal_create(owner_id => 'an', scopes => '{write}', expires_in => '400d');
INSERT INTO keypal.usage (key_id, hour, requests) VALUES
    (pg_temp.id('burst'), date_trunc('hour', now()) - interval '3 days', 5000),
    (pg_temp.id('burst'), date_trunc('hour', now()) - interval '2 days', 10),
    (pg_temp.id('burst'), date_trunc('hour', now()) - interval '1 day', 12);
SELECT is((SELECT r->>'usage_pattern' FROM keypal_analyze(pg_temp.id('burst')) r), 'bursty', 'one busy hour: bursty');
SELECT ok((SELECT r->'recommendations' @> '["Shorten the expiry: it is more than a year away."]' FROM keypal_analyze(pg_temp.id('burst')) r), 'expiry beyond a year is flagged');
SELECT is((SELECT keypal_analyze(pg_temp.id('burst'))), (SELECT keypal_analyze(pg_temp.id('burst'))), 'deterministic');
SELECT throws_ok($$SELECT keypal_analyze(gen_random_uuid())$$, 'P0002', NULL, 'unknown key: P0002');

-- "Has a rate limit" is what verify applies: here an environment's, given as rateLimit.
SELECT lives_ok($$SELECT keypal_configure(environments => '{"live": {"prefix": "sk_live_", "rateLimit": {"requests": 5, "window": "1m"}}}')$$,
                'an environment with a rateLimit');
CREATE TEMP TABLE live_key AS SELECT key, id FROM keypal_create(owner_id => 'an', env => 'live', scopes => '{read}', expires_in => '30d');
INSERT INTO k SELECT 'envlimited', id FROM live_key;
SELECT is((SELECT rate_limit_remaining FROM keypal_verify((SELECT key FROM live_key))), 4::bigint,
          'verify applies the environment''s rateLimit');
SELECT ok(NOT (SELECT r->'recommendations' @> '["Set a rate limit."]' FROM keypal_analyze(pg_temp.id('envlimited')) r),
          'and keypal_analyze does not recommend setting one');

SELECT * FROM finish();
ROLLBACK;
