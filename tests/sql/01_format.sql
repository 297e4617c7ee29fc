-- Key format, hashing and keypal_configure (SPEC §2).
BEGIN;
SELECT no_plan();

-- Defaults: no prefix, 32 characters of A-Za-z0-9.
SELECT ok((SELECT key ~ '^[A-Za-z0-9]{32}$' FROM keypal_create(owner_id => 'f1')), 'default key: 32 chars of A-Za-z0-9');

SELECT is(keypal_configure(prefix => 'sk_', length => 40, alphabet => 'a-f0-9')->>'prefix', 'sk_', 'configure returns the settings');
SELECT ok((SELECT key ~ '^sk_[a-f0-9]{40}$' FROM keypal_create(owner_id => 'f1')), 'prefix, length and alphabet apply');
SELECT is((keypal_configure())->>'length', '40', 'NULL arguments leave settings as they are');
SELECT is((SELECT count(DISTINCT (SELECT key FROM keypal_create(owner_id => 'f1_' || i))) FROM generate_series(1, 50) i), 50::bigint, '50 keys, 50 different plaintexts');

-- Bad configuration is refused with 22023, naming the setting, and changes nothing.
SELECT throws_like($$SELECT keypal_configure(alphabet => '')$$, '%alphabet%', 'empty alphabet refused');
SELECT throws_ok($$SELECT keypal_configure(alphabet => '')$$, '22023', NULL, 'empty alphabet: 22023');
SELECT throws_ok($$SELECT keypal_configure(alphabet => 'a')$$, '22023', NULL, 'one-letter alphabet: 22023');
SELECT throws_ok($$SELECT keypal_configure(length => 15)$$, '22023', NULL, 'length < 16: 22023');
-- Entropy floor: length x log2(alphabet size) >= 128 bits.
SELECT throws_like($$SELECT keypal_configure(length => 16, alphabet => 'ab')$$, '%16.0 bits%at least 128%', 'entropy floor: 16 x log2(2) refused, naming the bits');
SELECT throws_ok($$SELECT keypal_configure(length => 16, alphabet => 'ab')$$, '22023', NULL, 'entropy floor: 22023');
SELECT throws_ok($$SELECT keypal_configure(length => 21, alphabet => 'A-Za-z0-9')$$, '22023', NULL, 'entropy floor: 21 x log2(62) = 125 bits refused');
SELECT is((keypal_configure())->>'length', '40', 'a refused setting changes nothing');
SELECT lives_ok($$SELECT keypal_configure(length => 22, alphabet => 'A-Za-z0-9')$$, '22 x log2(62) = 131 bits accepted');
SELECT keypal_configure(length => 40, alphabet => 'a-f0-9');
SELECT throws_ok($$SELECT keypal.generate_key('', 16, 'ab')$$, '22023', NULL, 'generate_key refuses low entropy too');
SELECT throws_ok($$SELECT keypal_configure(length => 100000)$$, '22023', NULL, 'huge length: 22023');
SELECT throws_ok($$SELECT keypal_configure(algorithm => 'md5')$$, '22023', NULL, 'unknown algorithm: 22023');
SELECT throws_ok($$SELECT keypal_configure(prefix => 'has space')$$, '22023', NULL, 'prefix with a space: 22023');
SELECT throws_ok($$SELECT keypal_configure(last_used_resolution => 'soon')$$, '22007', NULL, 'bad duration: 22007');
SELECT throws_ok($$SELECT keypal_configure(rate_limit => '{"requests": 0, "window": "1m"}')$$, '22023', NULL, 'bad rate limit: 22023');
SELECT throws_ok($$SELECT keypal_configure(rate_limit => '{"requests": 5, "window": "whenever"}')$$, '22007', NULL, 'bad rate-limit window: 22007');
SELECT throws_ok($$SELECT keypal_configure(environments => '[1]')$$, '22023', NULL, 'environments must be an object');
SELECT throws_ok($$SELECT keypal_configure(environments => '{"live": {"prefix": 5}}')$$, '22023', NULL, 'environment prefix must be a string');
SELECT is((SELECT alphabet FROM keypal.settings), 'a-f0-9', 'refused configuration changed nothing');

-- JSON null clears a jsonb setting; SQL NULL leaves it.
SELECT keypal_configure(rate_limit => '{"requests": 10, "window": "1m"}');
SELECT is((keypal_configure())->'rate_limit', '{"requests": 10, "window": "1m"}'::jsonb, 'rate_limit set');
SELECT is((keypal_configure(rate_limit => 'null'))->'rate_limit', 'null'::jsonb, 'JSON null clears rate_limit');

-- Keys issued under earlier settings keep verifying.
CREATE TEMP TABLE old_key AS SELECT key FROM keypal_create(owner_id => 'f2', scopes => '{read}');
SELECT keypal_configure(prefix => 'pk_', length => 28, alphabet => 'A-Z');
SELECT ok((SELECT valid FROM keypal_verify((SELECT key FROM old_key))), 'key from earlier settings verifies');
SELECT is((SELECT error_code FROM keypal_verify('sk_' || repeat('a', 40))), 'INVALID_FORMAT', 'old format without a key: INVALID_FORMAT under new settings');
SELECT is((SELECT error_code FROM keypal_verify('pk_' || repeat('A', 28))), 'INVALID_KEY', 'right format, no such key: INVALID_KEY');

-- sha512, and keys hashed with either algorithm keep verifying.
SELECT keypal_configure(algorithm => 'sha512');
CREATE TEMP TABLE k512 AS SELECT key, id FROM keypal_create(owner_id => 'f3');
SELECT is((SELECT length(key_hash) FROM keypal.keys WHERE id = (SELECT id FROM k512)), 64, 'sha512 hash stored as 64 bytes');
SELECT ok((SELECT valid FROM keypal_verify((SELECT key FROM k512))), 'sha512 key verifies');
SELECT ok((SELECT valid FROM keypal_verify((SELECT key FROM old_key))), 'sha256 key verifies after the default became sha512');
SELECT keypal_configure(algorithm => 'sha256');
SELECT ok((SELECT valid FROM keypal_verify((SELECT key FROM k512))), 'sha512 key verifies after switching back');

-- The stored hash is keypal-TS compatible: ALG(key || lower-hex(sha256(salt))).
SELECT is(keypal.hash_key('abc', 'sha256'), digest('abc', 'sha256'), 'no salt: sha256(key)');
CREATE TEMP TABLE unsalted AS SELECT key FROM keypal_create(owner_id => 'f4');
SET keypal.salt = 'pepper';
SELECT is(keypal.hash_key('abc', 'sha256'), digest('abc' || encode(digest('pepper', 'sha256'), 'hex'), 'sha256'), 'salted sha256');
SELECT is(keypal.hash_key('abc', 'sha512'), digest('abc' || encode(digest('pepper', 'sha256'), 'hex'), 'sha512'), 'salted sha512');
SELECT is((SELECT error_code FROM keypal_verify((SELECT key FROM unsalted))), 'INVALID_KEY', 'a different salt: existing keys no longer match');
RESET keypal.salt;
SELECT ok((SELECT valid FROM keypal_verify((SELECT key FROM unsalted))), 'original salt: the key verifies again');

-- No plaintext is stored anywhere.
SELECT is((SELECT count(*) FROM keypal.keys k, old_key o WHERE to_jsonb(k)::text LIKE '%' || o.key || '%'), 0::bigint, 'plaintext not in keypal.keys');
SELECT is((SELECT count(*) FROM keypal.audit_log a, old_key o WHERE to_jsonb(a)::text LIKE '%' || o.key || '%'), 0::bigint, 'plaintext not in the audit log');

SELECT * FROM finish();
ROLLBACK;
