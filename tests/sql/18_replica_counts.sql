-- keypal.replica_counts: on the primary, a standby's worker ships what verify counted there.
-- Here: who may call it, what it refuses, its answer; a batch is added when its transaction
-- commits, so what it adds, once per batch number, is checked in tests/shell/replica_counts.t
-- (and shipped from real standbys in tests/shell/replicas.t).
BEGIN;
SELECT plan(14);

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
CREATE FUNCTION pg_temp.batch(q bigint, r bigint) RETURNS text LANGUAGE sql AS $$
    SELECT format('[{"k":"%s","l":%s,"h":[[%s,%s]],"q":[%s,%s],"r":[60000000,[[%s,%s]]]}]',
                  hex, day + 1, day, q, day, q, idx, r) FROM k
$$;

SELECT ok(keypal.replica_counts('s1', 1, pg_temp.batch(6, 6)) IS NOT NULL, 'a batch is taken');
SELECT is((SELECT keypal.replica_counts('s9', 1, pg_temp.batch(6, 6))::jsonb -> 0 FROM k),
          (SELECT jsonb_build_object('k', hex, 'q', jsonb_build_array(day, 6), 'r', jsonb_build_array(60000000, jsonb_build_array(jsonb_build_array(idx, 6)))) FROM k),
          'the answer: the key''s global quota use and window buckets, this batch in them');
SELECT is((SELECT (v.rate_limit_remaining, v.quota_remaining)::text FROM k, keypal_verify(k.key) v), '(9,99)',
          'nothing is added before the transaction commits (a rollback takes the batch back with its number)');
SELECT throws_ok($$SELECT keypal.replica_counts('s1', 4, '{}')$$, '22023', NULL, 'counts that are not a batch are refused (22023)');
SELECT throws_ok($$SELECT keypal.replica_counts('s1', 4, '[{"k":"00000000000000000000000000000000","h":[[1,-1]]}]')$$,
                 '22023', NULL, 'so is a negative count');
SELECT throws_ok($$SELECT keypal.replica_counts('s1', 4, '[{"k":"00000000000000000000000000000000"},{"k":"00000000000000000000000000000000"}]')$$,
                 '22023', 'keypal.replica_counts: counts is not a batch of counts: key 00000000000000000000000000000000 appears twice',
                 'and a key twice');
SELECT throws_ok(format($$SELECT keypal.replica_counts('s1', 4, '[%s]')$$,
                        (SELECT string_agg(format('{"k":"%s"}', lpad(to_hex(i), 32, '0')), ',') FROM generate_series(1, 10001) i)),
                 '22023', 'keypal.replica_counts: counts is not a batch of counts: 10001 keys, at most 10000 a batch',
                 'and a batch of more than 10 000 keys');
SELECT throws_ok($$SELECT keypal.replica_counts('', 0, '[]')$$, '22023',
                 'keypal.replica_counts: replica must be 1 to 64 characters and batch at least 1', 'and an empty name or batch 0');
SELECT is((SELECT keypal.replica_counts('s3', 1, format('[{"k":"%s","q":[%s,5]}]', hex, day + 2 * 86400000000))::jsonb FROM k),
          '[]'::jsonb, 'a quota period two days after the primary''s clock (a standby''s clock far ahead) is not taken');
CREATE FUNCTION pg_temp.nested() RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    BEGIN
        RETURN keypal.replica_counts('s4', 1, '[]');
    EXCEPTION WHEN division_by_zero THEN RETURN NULL;
    END;
END $$;
SELECT throws_ok($$SELECT pg_temp.nested()$$, '25000',
                 'keypal.replica_counts: call it in a transaction of its own, not in a subtransaction',
                 'in a subtransaction it refuses (a rollback of it would keep the batch and take back its number)');
SELECT is((SELECT count(*) FROM keypal.replica_batches WHERE replica = 's1'), 1::bigint, 'the batch number is recorded in the transaction');

SELECT * FROM finish();
ROLLBACK;
