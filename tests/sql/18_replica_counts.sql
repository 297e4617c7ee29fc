-- keypal.replica_counts: on the primary, a standby's worker ships what verify counted there;
-- each numbered batch is added once, and the answer is each key's global count, which the
-- primary's own verify decides on too. (tests/shell/replicas.t ships from real standbys.)
BEGIN;
SELECT plan(18);

CREATE ROLE rc_nobody;
SELECT ok(NOT has_function_privilege('public', 'keypal.replica_counts(text, bigint, text)', 'EXECUTE'),
          'PUBLIC may not call keypal.replica_counts');
SET LOCAL ROLE rc_nobody;
SELECT throws_ok($$SELECT keypal.replica_counts('x', 1, '[]')$$, '42501', NULL, 'nor may a role not granted it');
RESET ROLE;
SELECT ok((SELECT prosecdef AND proconfig::text LIKE '%search_path=pg_catalog, pg_temp%'
             FROM pg_proc WHERE oid = 'keypal.replica_counts(text, bigint, text)'::regprocedure),
          'it is SECURITY DEFINER with search_path pinned');

CREATE TEMP TABLE k AS
SELECT key, id, replace(id::text, '-', '') AS hex,
       floor((extract(epoch FROM clock_timestamp()) - 946684800) * 1e6 / 3000000)::bigint AS idx,
       ((extract(epoch FROM date_trunc('day', now(), 'UTC')) - 946684800) * 1e6)::bigint AS day
  FROM keypal_create(owner_id => 'rc', rate_limit => '{"requests": 10, "window": "1m"}',
                     quota => '{"limit": 100, "period": "day"}');
CREATE FUNCTION pg_temp.batch(q bigint, r bigint, window_us bigint DEFAULT 60000000) RETURNS text
LANGUAGE sql AS $$
    SELECT format('[{"k":"%s","l":%s,"h":[[%s,%s]],"q":[%s,%s],"r":[%s,[[%s,%s]]]}]',
                  hex, day + 1, day, q, day, q, window_us, idx, r) FROM k
$$;
CREATE FUNCTION pg_temp.ship(replica text, n bigint, q bigint, r bigint, window_us bigint DEFAULT 60000000)
RETURNS jsonb LANGUAGE sql AS $$ SELECT keypal.replica_counts(replica, n, pg_temp.batch(q, r, window_us))::jsonb $$;

SELECT is(pg_temp.ship('s1', 1, 6, 6) -> 0 -> 'q' -> 1, '6'::jsonb, 'a first batch: its quota count is the key''s global use');
SELECT is((SELECT pg_temp.ship('s1', 1, 6, 6) -> 0 -> 'r' -> 1 -> 0 FROM k), (SELECT jsonb_build_array(idx, 6) FROM k),
          'the answer carries the window''s buckets');
SELECT is(pg_temp.ship('s1', 1, 6, 6) -> 0 -> 'q' -> 1, '6'::jsonb, 'the same batch again (its answer lost) is answered, not added');
SELECT is(pg_temp.ship('s1', 2, 1, 1) -> 0 -> 'q' -> 1, '7'::jsonb, 'the next batch is added');
SELECT is(pg_temp.ship('s2', 1, 2, 2) -> 0 -> 'q' -> 1, '9'::jsonb, 'another standby''s batches are numbered apart');
SELECT is(pg_temp.ship('s1', 1, 5, 5) -> 0 -> 'q' -> 1, '9'::jsonb, 'an older batch number adds nothing');
SELECT is((SELECT string_agg(replica || '=' || batch, ' ' ORDER BY replica) FROM keypal.replica_batches), 's1=2 s2=1',
          'the last batch of each standby is recorded');
SELECT is((SELECT (v.rate_limit_remaining, v.quota_remaining)::text FROM k, keypal_verify(k.key) v), '(0,90)',
          'the primary decides on the global count: 9 admitted on the standbys, 1 here, of 10 a minute (quota: 100 - 10)');
SELECT is((SELECT (keypal_verify(key)).error_code FROM k), 'RATE_LIMITED', 'then refuses');
SELECT is(pg_temp.ship('s1', 3, 1, 1, 3600000000) -> 0 -> 'r', NULL,
          'a window of another length (a limit the standby has not replayed yet) is not added, nor answered');

SELECT is((SELECT keypal.replica_counts('s3', 1, format('[{"k":"%s","q":[%s,5]}]', hex, day + 2 * 86400000000))::jsonb FROM k),
          '[]'::jsonb, 'a quota period after the primary''s clock (a standby''s clock far ahead) is not taken');
SELECT throws_ok(format($$SELECT keypal.replica_counts('s1', 4, '[%s]')$$,
                        (SELECT string_agg('{"k":"00000000000000000000000000000000"}', ',') FROM generate_series(1, 10001))),
                 '22023', 'keypal.replica_counts: counts is not a batch of counts: 10001 keys, at most 10000 a batch',
                 'a batch of more than 10 000 keys is refused');
SELECT throws_ok($$SELECT keypal.replica_counts('s1', 4, '{}')$$, '22023', NULL, 'counts that are not a batch are refused (22023)');
SELECT throws_ok($$SELECT keypal.replica_counts('s1', 4, '[{"k":"00000000000000000000000000000000","h":[[1,-1]]}]')$$,
                 '22023', NULL, 'so is a negative count');
SELECT throws_ok($$SELECT keypal.replica_counts('', 0, '[]')$$, '22023',
                 'keypal.replica_counts: replica must be 1 to 64 characters and batch at least 1', 'and an empty name or batch 0');

SELECT * FROM finish();
ROLLBACK;
