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

-- Keys issued in another shape are never refused unlooked: checksummed under an alphabet
-- since changed; 38 long before checksums, then 32 with them (the same total length).
SELECT keypal_configure(alphabet => 'A-Za-z0-9_');
SELECT is((keypal_verify((SELECT key FROM k), 'read')).valid, true, 'a checksummed key still verifies after the alphabet changed');
CREATE TEMP TABLE p1 AS SELECT pg_temp.hash_probes() AS n;
SELECT is((keypal_verify(pg_temp.flip((SELECT key FROM k), 20))).error_code, 'INVALID_FORMAT', 'a mistyped one is still refused');
SELECT is(pg_temp.hash_probes(), (SELECT n FROM p1), 'without a lookup');
SELECT keypal_configure(alphabet => 'A-Za-z0-9');
SELECT keypal_configure(checksum => false, length => 38);
CREATE TEMP TABLE k38 AS SELECT key FROM keypal_create(owner_id => 'sum');
SELECT keypal_configure(checksum => true, length => 32);
SELECT is(length((SELECT key FROM k38)), length((SELECT key FROM k)), '(a key issued 38 long has the length of a checksummed one)');
SELECT is((keypal_verify((SELECT key FROM k38))).valid, true, 'a key issued before under another length still verifies');
SELECT is(jsonb_array_length((keypal_configure())->'issued'), 4, 'settings.issued remembers each shape keys were issued in');

-- The pattern for secret scanners.
SELECT is(keypal_key_pattern(), '(?:sk_live_|sk_test_)?(?:[0-9A-Z_a-z]{38}|[0-9A-Za-z]{38}|[0-9A-Za-z]{32})',
          'keypal_key_pattern(): the prefixes, then the shapes keys were issued in (alphabet, length with checksum)');
SELECT ok((SELECT key FROM k) ~ ('^' || keypal_key_pattern() || '$'), 'a new key matches it whole');
SELECT ok(('token = "' || (SELECT key FROM k) || '"') ~ keypal_key_pattern(), 'and is found in text');
SELECT ok((SELECT key FROM before_sum) ~ ('^' || keypal_key_pattern() || '$'), 'as do the keys issued before checksums');
SELECT keypal_configure(checksum => false);
SELECT is((keypal_verify((SELECT key FROM k), 'read')).valid, true, 'keys with a checksum keep verifying after it is turned off');

-- After an import (keys of shapes nobody recorded), every key is looked up.
SELECT keypal_configure(checksum => true);
SELECT lives_ok($$SELECT keypal_import(jsonb_build_array(jsonb_build_object('id', 'ts1', 'keyHash', encode(sha256('sk_live_imported'), 'hex'),
                                                       'metadata', '{"ownerId": "sum"}'::jsonb)))$$, 'an import');
CREATE TEMP TABLE p2 AS SELECT pg_temp.hash_probes() AS n;
SELECT is((keypal_verify(pg_temp.flip((SELECT key FROM k), 20))).error_code, 'INVALID_FORMAT', 'a mistyped key is still INVALID_FORMAT');
SELECT cmp_ok(pg_temp.hash_probes(), '>', (SELECT n FROM p2), 'but after a lookup: an imported key could have any shape');

SET LOCAL ROLE keypal_plain;
SELECT throws_ok($$SELECT keypal_key_pattern()$$, '42501', NULL, 'PUBLIC may not read the pattern (management)');
RESET ROLE;

SELECT * FROM finish();
ROLLBACK;
