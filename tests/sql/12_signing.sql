-- Request signing (SPEC §3): signing keys, keypal_sign's documented canonical string
-- (checked against pgcrypto), keypal_verify_signature's refusals, replay, rotation.
-- Replay across sessions and the client recipes run for real: tests/shell/signing.t.
SET keypal.signing_secret = 'pgtap server secret';
-- A signature dated within a few seconds of the start of this server's replay memory is
-- refused (a server run before may have accepted it): wait, before the test's transaction
-- (and its now()) begins, until a fresh one is accepted.
DO $$
DECLARE
    kid uuid;
    sec text;
BEGIN
    SELECT id, signing_secret INTO kid, sec FROM keypal_create(owner_id => 'warm-up', signing => true);
    FOR i IN 1..40 LOOP
        EXIT WHEN keypal_verify_signature(kid, 'GET', '/warm-up/' || i, '', keypal_sign(sec, 'GET', '/warm-up/' || i, '', clock_timestamp()));
        PERFORM pg_sleep(0.25);
    END LOOP;
END $$;
BEGIN;
SELECT no_plan();

CREATE TEMP TABLE k AS SELECT * FROM keypal_create(owner_id => 'signer', scopes => '{read}', signing => true);
SELECT ok((SELECT signing_secret ~ '^kps_[0-9a-f]{64}$' FROM k), 'signing => true returns signing_secret once');
SELECT is((SELECT signing_secret FROM keypal_create(owner_id => 'plain')), NULL, 'a key without signing has none');
SELECT ok(NOT EXISTS (SELECT 1 FROM keypal.keys kk WHERE to_jsonb(kk)::text LIKE '%' || (SELECT substr(signing_secret, 5, 32) FROM k) || '%')
          AND NOT EXISTS (SELECT 1 FROM keypal.audit_log a WHERE to_jsonb(a)::text LIKE '%' || (SELECT substr(signing_secret, 5, 32) FROM k) || '%')
          AND NOT EXISTS (SELECT 1 FROM keypal.events e WHERE e.payload::text LIKE '%' || (SELECT substr(signing_secret, 5, 32) FROM k) || '%'),
          'no table holds it (keys, audit log, events)');
SELECT is((SELECT signing_secret FROM k), 'kps_' || encode(hmac('keypal signing secret:' || (SELECT id FROM k)::text, 'pgtap server secret', 'sha256'), 'hex'),
          'it is the documented derivation');

-- keypal_sign: the documented canonical string
SELECT is(keypal_sign('s3cret', 'post', '/v1/items?a=1', '{"x":1}', to_timestamp(1700000000)),
          't=1700000000,v1=' || encode(hmac(E'POST\n/v1/items?a=1\n1700000000\n' || encode(digest('{"x":1}', 'sha256'), 'hex'),
                                             's3cret', 'sha256'), 'hex'),
          'keypal_sign: HMAC-SHA256 over METHOD, path, t and sha256(body), one per line');
SELECT is(keypal_sign('s', 'GET', '/'), keypal_sign('s', 'GET', '/', '', now()), 'body defaults to empty, ts to now()');
SELECT is(tap.err($$SELECT keypal_sign(NULL, 'GET', '/')$$), '22023', 'a secret is required');
SELECT is(tap.err($$SELECT keypal_sign('s', '', '/')$$), '22023', 'a method is required');

-- keypal_verify_signature
CREATE TEMP TABLE sig AS SELECT keypal_sign((SELECT signing_secret FROM k), 'POST', '/orders', '{"n":1}') AS s;
SELECT is(keypal_verify_signature((SELECT id FROM k), 'POST', '/orders', '{"n":1}', (SELECT s FROM sig)), true, 'a fresh signature verifies');
SELECT is(keypal_verify_signature((SELECT id FROM k), 'POST', '/orders', '{"n":1}', (SELECT s FROM sig)), false, 'once: the same signature again is a replay');
SELECT is(keypal_verify_signature((SELECT id FROM k), 'POST', '/orders', '{"n":1}', v), false, 'nor as ' || d)
  FROM (SELECT s FROM sig) x(s),
       LATERAL (VALUES ('v1 first', 'v1=' || split_part(x.s, ',v1=', 2) || ',' || split_part(x.s, ',', 1)),
                       ('with a space', replace(x.s, ',', ', ')),
                       ('upper case', upper(x.s)),
                       ('a leading zero', replace(x.s, 't=', 't=0')),
                       ('padded', ' ' || x.s || ' ')) AS variant(d, v);
CREATE TEMP TABLE other_key AS SELECT * FROM keypal_create(owner_id => 'signer2', signing => true);
SELECT is(keypal_verify_signature((SELECT id FROM other_key), 'PUT', '/a', '', keypal_sign((SELECT signing_secret FROM k), 'PUT', '/a', '')),
          false, 'a signature made with key A''s secret does not verify for key B');
CREATE TEMP TABLE sig2 AS SELECT keypal_sign((SELECT signing_secret FROM k), 'POST', '/orders', '{"n":2}') AS s;
SELECT is(keypal_verify_signature((SELECT id FROM k), 'POST', '/orders', '{"n":1}', (SELECT s FROM sig2)), false, 'another body: false');
SELECT is(keypal_verify_signature((SELECT id FROM k), 'GET', '/orders', '{"n":2}', (SELECT s FROM sig2)), false, 'another method: false');
SELECT is(keypal_verify_signature((SELECT id FROM k), 'POST', '/orders/1', '{"n":2}', (SELECT s FROM sig2)), false, 'another path: false');
SELECT is(keypal_verify_signature((SELECT id FROM k), 'POST', '/orders', '{"n":2}', (SELECT s FROM sig2)), true, 'the right request still verifies after those (they were not counted as seen)');
SELECT is(keypal_verify_signature((SELECT id FROM k), 'POST', '/x', '', keypal_sign((SELECT signing_secret FROM k), 'POST', '/x', '', now() - interval '10 minutes')),
          false, 'older than max_age (5m): false');
SELECT is(keypal_verify_signature((SELECT id FROM k), 'POST', '/w', '', keypal_sign((SELECT signing_secret FROM k), 'POST', '/w', '', clock_timestamp() - interval '6 seconds'), max_age => '3s'),
          false, 'older than a given max_age (3s): false');
SELECT is(keypal_verify_signature((SELECT id FROM k), 'POST', '/w', '', keypal_sign((SELECT signing_secret FROM k), 'POST', '/w', '', clock_timestamp()), max_age => '3s'),
          true, 'within it: true');
SELECT is(tap.err($$SELECT keypal_verify_signature(gen_random_uuid(), 'GET', '/', '', 'x', max_age => '2h')$$), '22023', 'max_age is at most an hour');
SELECT is(keypal_verify_signature((SELECT id FROM k), 'POST', '/y', '', keypal_sign((SELECT signing_secret FROM k), 'POST', '/y', '', clock_timestamp() + interval '30 seconds')),
          false, 'from the future beyond the skew (5 s): false');
SELECT is(keypal_verify_signature((SELECT id FROM k), 'POST', '/z', '', keypal_sign('kps_wrong', 'POST', '/z', '')), false, 'another secret: false');
SELECT is(keypal_verify_signature((SELECT id FROM k), 'POST', '/z', '', 't=' || extract(epoch FROM now())::bigint || ',v1=zz'), false, 'a malformed signature: false');
SELECT is(tap.err($$SELECT keypal_sign('s', 'GET', E'/a\nb')$$), '22023', 'keypal_sign refuses a path with a line break');
SELECT is(tap.err($$SELECT keypal_sign('s', 'GET', '/', '', 'infinity')$$), '22023', 'and an infinite time');
SELECT is(keypal_verify_signature((SELECT id FROM k), 'POST', '/z', '', NULL), false, 'NULL: false');
CREATE TEMP TABLE plain AS SELECT * FROM keypal_create(owner_id => 'plain');
SELECT is(keypal_verify_signature((SELECT id FROM plain), 'GET', '/', '',
          keypal_sign(keypal.signing_secret_for((SELECT id FROM plain)), 'GET', '/', '')), false, 'a key without signing: false, even with the derived secret');
SELECT is(keypal_verify_signature(gen_random_uuid(), 'GET', '/', '', keypal_sign('x', 'GET', '/', '')), false, 'an unknown key: false');
SELECT is(tap.err($$SELECT keypal_verify_signature((SELECT id FROM k), 'GET', '/', '', 't=1,v1=' || repeat('a', 64), max_age => 'soon')$$), '22007', 'a bad max_age: 22007');

-- Rotation gives a new secret; a revoked or disabled key signs nothing
SELECT keypal_disable((SELECT id FROM k));
SELECT is(keypal_verify_signature((SELECT id FROM k), 'GET', '/d', '', keypal_sign((SELECT signing_secret FROM k), 'GET', '/d', '')), false, 'a disabled key: false');
SELECT keypal_enable((SELECT id FROM k));
CREATE TEMP TABLE r AS SELECT * FROM keypal_rotate((SELECT id FROM k));
SELECT ok((SELECT r.signing_secret ~ '^kps_' AND r.signing_secret <> k.signing_secret FROM r, k), 'rotating a signing key returns a new signing secret');
SELECT is(keypal_verify_signature((SELECT id FROM k), 'GET', '/r', '', keypal_sign((SELECT signing_secret FROM k), 'GET', '/r', '')), false, 'the rotated-away key: false');
SELECT is(keypal_verify_signature((SELECT id FROM r), 'GET', '/r', '', keypal_sign((SELECT signing_secret FROM r), 'GET', '/r', '')), true, 'the new key with its new secret: true');

-- Any role may sign and verify signatures; the derivation stays the owner's
GRANT SELECT ON r TO keypal_plain;
SET LOCAL ROLE keypal_plain;
SELECT ok(keypal_sign('s', 'GET', '/') ~ '^t=\d+,v1=[0-9a-f]{64}$', 'a plain role can keypal_sign');
SELECT is(keypal_verify_signature((SELECT id FROM r), 'GET', '/p', '', keypal_sign((SELECT signing_secret FROM r), 'GET', '/p', '')), true, 'and keypal_verify_signature');
SELECT throws_ok($$SELECT keypal.signing_secret_for(gen_random_uuid())$$, '42501', NULL, 'but not derive a secret');
RESET ROLE;

SELECT * FROM finish();
ROLLBACK;
