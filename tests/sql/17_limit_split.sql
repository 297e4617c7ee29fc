-- keypal_configure(limit_split => n): n servers (a primary and its standbys) each enforce
-- their share of every rate limit and quota, counting only their own traffic. Here, on the
-- primary: its share is the limit less the standbys' floor(limit / n) each, so the shares
-- add up to the limit. (tests/shell/replicas.t checks the standbys' shares.)
BEGIN;
SELECT plan(12);

SELECT is(keypal_configure()->>'limit_split', '1', 'limit_split is 1 by default: one server, the whole limit');
SELECT throws_ok($$SELECT keypal_configure(limit_split => 0)$$, '22023',
    'invalid limit_split: the number of servers sharing each limit, 1 to 1000, got 0', 'limit_split 0 is refused');
SELECT throws_ok($$SELECT keypal_configure(limit_split => 1001)$$, '22023', NULL, 'so is 1001');
SELECT is(keypal_configure(limit_split => 3)->>'limit_split', '3', 'limit_split 3');

CREATE TEMP TABLE k AS
SELECT (SELECT key FROM keypal_create(owner_id => 'split', rate_limit => '{"requests": 10, "window": "1h"}')) AS rate_key,
       (SELECT key FROM keypal_create(owner_id => 'split', quota => '{"limit": 7, "period": "day"}')) AS quota_key,
       (SELECT key FROM keypal_create(owner_id => 'split', rate_limit => '{"requests": 2, "window": "1h"}')) AS small_key;
SELECT is((SELECT (keypal_verify(rate_key)).rate_limit_remaining FROM k), 3::bigint,
          'a rate limit of 10 shared by 3: the primary''s share is 10 - 2 x 3 = 4 (3 left after one)');
SELECT is((SELECT count(*) FILTER (WHERE (keypal_verify(k.rate_key)).valid) FROM k, generate_series(1, 9)), 3::bigint,
          'it admits 4 in all');
SELECT is((SELECT (keypal_verify(rate_key)).error_code FROM k), 'RATE_LIMITED', 'then refuses');
SELECT is((SELECT count(*) FILTER (WHERE (keypal_verify(k.quota_key)).valid) FROM k, generate_series(1, 7)), 3::bigint,
          'a quota of 7 shared by 3: the primary admits 7 - 2 x 2 = 3');
SELECT is((SELECT (keypal_verify(quota_key)).error_code FROM k), 'QUOTA_EXCEEDED', 'then QUOTA_EXCEEDED');
SELECT is((SELECT count(*) FILTER (WHERE (keypal_verify(k.small_key)).valid) FROM k, generate_series(1, 3)), 2::bigint,
          'a limit smaller than the servers: the primary keeps all of it (the standbys none)');

SELECT is(keypal_configure(limit_split => 1)->>'limit_split', '1', 'back to 1');
CREATE TEMP TABLE k2 AS SELECT key FROM keypal_create(owner_id => 'split', rate_limit => '{"requests": 10, "window": "1h"}');
SELECT is((SELECT count(*) FILTER (WHERE (keypal_verify(k2.key)).valid) FROM k2, generate_series(1, 12)), 10::bigint,
          'one server: the whole limit');

SELECT * FROM finish();
ROLLBACK;
