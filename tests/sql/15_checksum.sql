-- Scannable keys (SPEC §3): keypal_configure(checksum => true) makes new keys end in a
-- checksum that verify checks without a lookup; keys issued before keep verifying;
-- keypal_key_pattern() matches the keys issued now.
BEGIN;
SELECT no_plan();

SELECT keypal_configure(environments => '{"live": {"prefix": "sk_live_"}, "test": {"prefix": "sk_test_"}}', default_env => 'live');
CREATE TEMP TABLE before_sum AS SELECT key, id FROM keypal_create(owner_id => 'sum', scopes => '{read}');
SELECT is((keypal_configure(checksum => true))->>'checksum', 'true', 'keypal_configure(checksum => true)');
CREATE TEMP TABLE k AS SELECT key, id FROM keypal_create(owner_id => 'sum', scopes => '{read}');
SELECT is(length((SELECT key FROM k)), 8 + 32 + 6, 'a new key: prefix, 32 random characters, 6 of checksum (62 letters and digits)');
SELECT is(right((SELECT key FROM k), 6), keypal.key_checksum(left((SELECT key FROM k), -6), 'A-Za-z0-9'),
          'the checksum is of everything before it');
SELECT is((keypal_verify((SELECT key FROM k), 'read')).valid, true, 'it verifies');
SELECT is((keypal_verify((SELECT key FROM before_sum), 'read')).valid, true, 'a key issued before checksums keeps verifying');

-- A mistyped key: INVALID_FORMAT, and the keys table is not touched.
CREATE FUNCTION pg_temp.flip(key text, pos int) RETURNS text LANGUAGE sql AS $$
    SELECT overlay(key PLACING CASE WHEN substr(key, pos, 1) = 'a' THEN 'b' ELSE 'a' END FROM pos FOR 1)
$$;
-- Scans of the key_hash index in this transaction (verify's lookups).
CREATE FUNCTION pg_temp.hash_probes() RETURNS bigint LANGUAGE sql AS $$
    SELECT pg_stat_get_xact_numscans('keypal.keys_key_hash_key'::regclass)
$$;
SELECT is((SELECT count(*) FROM generate_series(9, 46) pos
            WHERE (keypal_verify(pg_temp.flip((SELECT key FROM k), pos))).error_code = 'INVALID_FORMAT'), 38::bigint,
          'one character changed anywhere after the prefix: INVALID_FORMAT');
CREATE TEMP TABLE p0 AS SELECT pg_temp.hash_probes() AS n;
SELECT is((keypal_verify(pg_temp.flip((SELECT key FROM k), 20))).error_code, 'INVALID_FORMAT', 'a bad checksum');
SELECT is(pg_temp.hash_probes(), (SELECT n FROM p0), 'is answered without a lookup');
SELECT is((keypal_verify('sk_live_' || repeat('x', 32) || keypal.key_checksum('sk_live_' || repeat('x', 32), 'A-Za-z0-9'))).error_code,
          'INVALID_KEY', 'a well-formed key with a right checksum that does not exist: INVALID_KEY');
SELECT cmp_ok(pg_temp.hash_probes(), '>', (SELECT n FROM p0), '(after a lookup)');
SELECT is((keypal_verify(left((SELECT key FROM k), -1))).error_code, 'INVALID_FORMAT', 'a truncated key: INVALID_FORMAT');

-- The pattern for secret scanners.
SELECT is(keypal_key_pattern(), '(?:sk_live_|sk_test_)?[0-9A-Za-z]{38}', 'keypal_key_pattern(): the prefixes, the alphabet, the length with checksum');
SELECT ok((SELECT key FROM k) ~ ('^' || keypal_key_pattern() || '$'), 'a new key matches it whole');
SELECT ok(('token = "' || (SELECT key FROM k) || '"') ~ keypal_key_pattern(), 'and is found in text');
SELECT keypal_configure(checksum => false);
SELECT is(keypal_key_pattern(), '(?:sk_live_|sk_test_)?[0-9A-Za-z]{32}', 'without checksums: 32 characters');
SELECT ok((SELECT key FROM before_sum) ~ ('^' || keypal_key_pattern() || '$'), 'which the keys issued then match');
SELECT is((keypal_verify((SELECT key FROM k), 'read')).valid, true, 'keys with a checksum keep verifying after it is turned off');

SET LOCAL ROLE keypal_plain;
SELECT throws_ok($$SELECT keypal_key_pattern()$$, '42501', NULL, 'PUBLIC may not read the pattern (management)');
RESET ROLE;

SELECT * FROM finish();
ROLLBACK;
