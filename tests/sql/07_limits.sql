-- Rate limits and quotas, their precedence, and usage tracking.
BEGIN;
SELECT no_plan();

CREATE TEMP TABLE k (label text PRIMARY KEY, key text, id uuid);
CREATE FUNCTION pg_temp.key(l text) RETURNS text LANGUAGE sql AS $$ SELECT key FROM k WHERE label = l $$;
CREATE FUNCTION pg_temp.id(l text) RETURNS uuid LANGUAGE sql AS $$ SELECT id FROM k WHERE label = l $$;

-- Per-key rate limit: 3 per minute.
INSERT INTO k SELECT 'r', key, id FROM keypal_create(owner_id => 'lim', scopes => '{read}', rate_limit => '{"requests": 3, "window": "1m"}');
SELECT results_eq($$SELECT valid, rate_limit_remaining FROM keypal_verify(pg_temp.key('r'), 'read')$$, $$VALUES (true, 2::bigint)$$, '1st of 3: remaining 2');
SELECT is((keypal_verify(pg_temp.key('r'), 'admin')).error_code, 'INSUFFICIENT_SCOPE', 'a refused verify...');
SELECT is((keypal_verify(pg_temp.key('r'), 'read')).rate_limit_remaining, 1::bigint, '...does not count toward the limit');
SELECT is((keypal_verify(pg_temp.key('r'), 'read')).rate_limit_remaining, 0::bigint, '3rd of 3: remaining 0');
SELECT results_eq($$SELECT valid, error_code, rate_limited, retry_after_ms > 0 AND retry_after_ms <= 63000 FROM keypal_verify(pg_temp.key('r'), 'read')$$,
    $$VALUES (false, 'RATE_LIMITED', true, true)$$, '4th: RATE_LIMITED with retry_after_ms');
SELECT ok(tap.err(format('SELECT keypal_require(%L)', pg_temp.key('r'))) ~ '^53400 RATE_LIMITED retry after \d+ ms$', 'require: 53400, RATE_LIMITED in DETAIL, the delay in HINT');
SELECT throws_ok(format('SELECT keypal_verify(%L, cost => 0)', pg_temp.key('r')), '22023', NULL, 'cost below 1: 22023');

-- cost weighs a request.
INSERT INTO k SELECT 'c', key, id FROM keypal_create(owner_id => 'lim', rate_limit => '{"requests": 5, "window": "1h"}');
SELECT is((keypal_verify(pg_temp.key('c'), cost => 4)).rate_limit_remaining, 1::bigint, 'cost 4 of 5');
SELECT is((keypal_verify(pg_temp.key('c'), cost => 2)).error_code, 'RATE_LIMITED', 'cost 2 more does not fit');
SELECT ok((keypal_verify(pg_temp.key('c'), cost => 1)).valid, 'cost 1 still fits');

-- Precedence: key, else policy, else environment (null = none), else the default.
SELECT keypal_configure(rate_limit => '{"requests": 1, "window": "1h"}',
                        environments => '{"live": {}, "test": {"rate_limit": null}}');
SELECT keypal_define_policy('burst', rate_limit => '{"requests": 2, "window": "1h"}');
INSERT INTO k SELECT 'dflt', key, id FROM keypal_create(owner_id => 'lim', env => 'live');
INSERT INTO k SELECT 'test', key, id FROM keypal_create(owner_id => 'lim', env => 'test');
INSERT INTO k SELECT 'pol', key, id FROM keypal_create(owner_id => 'lim', env => 'live', policy => 'burst');
INSERT INTO k SELECT 'none', key, id FROM keypal_create(owner_id => 'lim', env => 'live', rate_limit => 'null');
SELECT results_eq($$SELECT (keypal_verify(pg_temp.key('dflt'))).valid FROM generate_series(1, 2)$$, $$VALUES (true), (false)$$, 'the default limit (1/h) applies');
SELECT results_eq($$SELECT (keypal_verify(pg_temp.key('test'))).valid FROM generate_series(1, 3)$$, $$VALUES (true), (true), (true)$$, 'environment rate_limit null: unlimited');
SELECT results_eq($$SELECT (keypal_verify(pg_temp.key('pol'))).valid FROM generate_series(1, 3)$$, $$VALUES (true), (true), (false)$$, 'the policy limit (2/h) beats the default');
SELECT results_eq($$SELECT (keypal_verify(pg_temp.key('none'))).valid FROM generate_series(1, 3)$$, $$VALUES (true), (true), (true)$$, 'key rate_limit null: unlimited despite the default');
SELECT keypal_configure(rate_limit => 'null', environments => 'null');

-- Quotas: block, warn, throttle.
INSERT INTO k SELECT 'qb', key, id FROM keypal_create(owner_id => 'lim', quota => '{"limit": 2, "period": "day"}');
SELECT results_eq($$SELECT valid, quota_remaining FROM keypal_verify(pg_temp.key('qb'))$$, $$VALUES (true, 1::bigint)$$, 'quota: 1 of 2');
SELECT is((keypal_verify(pg_temp.key('qb'))).quota_remaining, 0::bigint, 'quota: 2 of 2');
SELECT is((keypal_verify(pg_temp.key('qb'))).error_code, 'QUOTA_EXCEEDED', 'block: QUOTA_EXCEEDED');
SELECT ok(tap.err(format('SELECT keypal_require(%L)', pg_temp.key('qb'))) LIKE '53400 QUOTA_EXCEEDED%', 'require: 53400 QUOTA_EXCEEDED');
SELECT results_eq($$SELECT used, "limit", remaining, period, resets_at = date_trunc('day', now() + interval '1 day', 'UTC') FROM keypal_usage(pg_temp.id('qb'))$$,
    $$VALUES (2::bigint, 2::bigint, 0::bigint, 'day', true)$$, 'keypal_usage');
INSERT INTO k SELECT 'qw', key, id FROM keypal_create(owner_id => 'lim', quota => '{"limit": 1, "period": "month", "on_exceeded": "warn"}');
SELECT results_eq($$SELECT (keypal_verify(pg_temp.key('qw'))).valid FROM generate_series(1, 3)$$, $$VALUES (true), (true), (true)$$, 'warn: still valid over the quota');
SELECT is((SELECT count(*) FROM keypal.events WHERE key_id = pg_temp.id('qw') AND event = 'quota.exceeded'), 0::bigint, 'warn: no event from verify itself (the flush worker emits it: tests/shell/flush.t)');
SELECT is((SELECT used FROM keypal_usage(pg_temp.id('qw'))), 3::bigint, 'warn: use still counted');
INSERT INTO k SELECT 'qt', key, id FROM keypal_create(owner_id => 'lim', quota => '{"limit": 1, "on_exceeded": "throttle"}', rate_limit => '{"requests": 20, "window": "1h"}');
SELECT results_eq($$SELECT (keypal_verify(pg_temp.key('qt'))).valid FROM generate_series(1, 3)$$, $$VALUES (true), (true), (false)$$, 'throttle: over the quota, the rate limit tightens to a tenth (2 per hour, the first request included)');

-- keypal_track_usage.
SELECT keypal_track_usage(pg_temp.id('qb'), endpoint => '/api/generate', tokens => 1500, cost => 0.002);
SELECT keypal_track_usage(pg_temp.id('qb'), endpoint => '/api/generate', tokens => 500, cost => 0.001, requests => 2);
SELECT results_eq($$SELECT used, tokens, cost FROM keypal_usage(pg_temp.id('qb'))$$, $$VALUES (5::bigint, 2000::bigint, 0.003::numeric)$$, 'tracked requests, tokens and cost');
SELECT is((SELECT requests FROM keypal.usage WHERE key_id = pg_temp.id('qb') AND endpoint = '/api/generate'), 3::bigint, 'usage kept per hour and endpoint');
SELECT throws_ok($$SELECT keypal_track_usage(gen_random_uuid())$$, 'P0002', NULL, 'track_usage of an unknown key: P0002');
SELECT throws_ok(format('SELECT keypal_track_usage(%L, tokens => -1)', pg_temp.id('qb')), '22023', NULL, 'negative tokens: 22023');
SELECT throws_ok($$SELECT * FROM keypal_usage(gen_random_uuid())$$, 'P0002', NULL, 'usage of an unknown key: P0002');

SELECT * FROM finish();
ROLLBACK;
