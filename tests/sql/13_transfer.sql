-- Export and import (SPEC §3): keypal_export's records, keypal_import of them and of the
-- TypeScript keypal's records, on_conflict, validation (a bad record names its index and
-- field and writes nothing), audit, and keypal.previous_salt.
-- The round trip between two databases runs in tests/shell/transfer.t.
BEGIN;
SELECT no_plan();
SET LOCAL keypal.salt = 'pepper';

-- A key's hash under this salt, SPEC §2's: ALG(key || hex(sha256(salt))). (The TypeScript
-- keypal's own salted hash, ALG(key || salt), is tested below with keypal.typescript_salt.)
CREATE FUNCTION pg_temp.ts_hash(key text, alg text DEFAULT 'sha256') RETURNS text LANGUAGE sql AS $$
    SELECT encode(CASE alg WHEN 'sha256' THEN sha256(convert_to(key || encode(sha256('pepper'), 'hex'), 'UTF8'))
                           ELSE sha512(convert_to(key || encode(sha256('pepper'), 'hex'), 'UTF8')) END, 'hex')
$$;
CREATE FUNCTION pg_temp.keys() RETURNS bigint LANGUAGE sql AS $$ SELECT count(*) FROM keypal.keys $$;
CREATE FUNCTION pg_temp.audits() RETURNS bigint LANGUAGE sql AS $$ SELECT count(*) FROM keypal.audit_log $$;

-- TypeScript keypal records, as its export writes them.
CREATE TEMP TABLE ts AS SELECT jsonb_build_array(
    jsonb_build_object('id', 'V1StGXR8_Z5jdHi6B-myT', 'keyHash', pg_temp.ts_hash('sk_ts_live_one'),
        'metadata', jsonb_build_object('ownerId', 'ts-user', 'name', 'Main', 'scopes', jsonb_build_array('read'),
            'resources', jsonb_build_object('project:1', jsonb_build_array('write')),
            'expiresAt', NULL, 'createdAt', '2025-01-15T10:30:00.000Z', 'lastUsedAt', '2025-02-01T08:00:00.000Z',
            'enabled', true, 'revokedAt', NULL, 'rotatedTo', NULL, 'tags', jsonb_build_array('prod'), 'plan', 'pro')),
    jsonb_build_object('id', 'old-key', 'keyHash', pg_temp.ts_hash('sk_ts_revoked'),
        'metadata', jsonb_build_object('ownerId', 'ts-user', 'revokedAt', '2025-03-01T00:00:00.000Z',
            'rotatedTo', 'V1StGXR8_Z5jdHi6B-myT')),
    jsonb_build_object('id', 'off', 'keyHash', pg_temp.ts_hash('sk_ts_disabled'),
        'metadata', jsonb_build_object('ownerId', 'ts-user', 'enabled', false)),
    jsonb_build_object('id', 'gone', 'keyHash', pg_temp.ts_hash('sk_ts_expired'),
        'metadata', jsonb_build_object('ownerId', 'ts-user', 'expiresAt', '2025-01-01T00:00:00.000Z')),
    jsonb_build_object('id', '6f9619ff-8b86-d011-b42d-00c04fc964ff', 'keyHash', upper(pg_temp.ts_hash('sk_ts_512', 'sha512')),
        'metadata', jsonb_build_object('ownerId', 'ts-other'))
) AS data;

SELECT results_eq($$SELECT * FROM keypal_import((SELECT data FROM ts))$$,
                  $$VALUES (5::bigint, 0::bigint, 0::bigint)$$, 'TypeScript records import: imported, skipped, overwritten');
SELECT is((keypal_verify('sk_ts_live_one', scope => 'read')).valid, true, 'a TypeScript key verifies with its old plaintext under the same salt');
SELECT is((keypal_verify('sk_ts_live_one', scope => 'admin')).error_code, 'INSUFFICIENT_SCOPE', 'with its scopes');
SELECT is((keypal_verify('sk_ts_live_one', scope => 'write', resource => 'project:1')).valid, true, 'and its resource scopes');
SELECT is((keypal_verify('sk_ts_revoked')).error_code, 'REVOKED', 'revokedAt: REVOKED');
SELECT is((keypal_verify('sk_ts_disabled')).error_code, 'DISABLED', 'enabled false: DISABLED');
SELECT is((keypal_verify('sk_ts_expired')).error_code, 'EXPIRED', 'a past expiresAt: EXPIRED');
SELECT is((keypal_verify('sk_ts_512')).valid, true, 'a sha512 hash (upper-case hex) verifies');
SELECT is((keypal_verify('sk_ts_512')).key_id, '6f9619ff-8b86-d011-b42d-00c04fc964ff'::uuid, 'an id that is a uuid is kept');
SELECT is((SELECT metadata FROM keypal.keys WHERE owner_id = 'ts-user' AND name = 'Main'),
          '{"plan": "pro", "imported_id": "V1StGXR8_Z5jdHi6B-myT"}'::jsonb,
          'other ids become uuids; the original and the application''s own fields stay in metadata');
SELECT is((SELECT (created_at, last_used_at, tags) FROM keypal.keys WHERE name = 'Main'),
          ('2025-01-15 10:30:00+00'::timestamptz, '2025-02-01 08:00:00+00'::timestamptz, '{prod}'::text[]),
          'createdAt, lastUsedAt and tags are kept');
SELECT is((SELECT o.rotated_to = n.id FROM keypal.keys o, keypal.keys n
            WHERE o.key_hash = decode(pg_temp.ts_hash('sk_ts_revoked'), 'hex') AND n.name = 'Main'),
          true, 'rotatedTo links to the mapped id');
SELECT is((SELECT count(*) FROM keypal.audit_log WHERE action = 'imported' AND owner_id IN ('ts-user', 'ts-other')),
          5::bigint, 'every imported key is audited as imported');
SELECT is((SELECT context FROM keypal.audit_log WHERE action = 'imported' AND owner_id = 'ts-other'),
          '{"records": {"typescript": 5}, "on_conflict": "error"}'::jsonb, 'with what was imported in the context');
SELECT is((SELECT count(*) FROM keypal.events WHERE event = 'key.created'
            AND (payload->>'ownerId') IN ('ts-user', 'ts-other')), 0::bigint, 'an import is not a key.created event');
SELECT results_eq($$SELECT * FROM keypal_import((SELECT data FROM ts), on_conflict => 'skip')$$,
                  $$VALUES (0::bigint, 5::bigint, 0::bigint)$$, 'the same records again, skip: all skipped (ids map the same way)');
SELECT is(tap.err($$SELECT keypal_import((SELECT data FROM ts))$$), '23505  on_conflict => ''skip'' leaves existing keys as they are; ''overwrite'' replaces them',
          'the default on_conflict, error: 23505 for an id that exists');

-- keypal.previous_salt: a salt can be rotated.
SET LOCAL keypal.salt = 'new pepper';
SELECT is((keypal_verify('sk_ts_live_one')).valid, false, 'another salt: the old keys do not verify');
SET LOCAL keypal.previous_salt = 'pepper';
SELECT is((keypal_verify('sk_ts_live_one')).valid, true, 'with keypal.previous_salt they do');
SELECT is((keypal_verify('sk_ts_512')).valid, true, 'under either algorithm');
SELECT is((keypal_verify('sk_ts_nothing')).valid, false, 'and no other key does');
SET LOCAL keypal.previous_salt = '';
SELECT is((keypal_verify('sk_ts_live_one')).valid, false, 'previous_salt '''' means keys made with no salt');
SELECT is((SELECT count(*) FROM keypal_import(jsonb_build_array(jsonb_build_object('id', 'nosalt',
              'keyHash', encode(sha256('sk_made_without_salt'), 'hex'), 'metadata', '{"ownerId": "ts-nosalt"}'::jsonb)))), 1::bigint,
          'a key made with no salt imports');
SELECT is((keypal_verify('sk_made_without_salt')).valid, true, 'and verifies with previous_salt ''''');
-- keypal.typescript_salt: the TypeScript keypal appends its salt as it is.
SELECT is((SELECT count(*) FROM keypal_import(jsonb_build_array(jsonb_build_object('id', 'rawsalt',
              'keyHash', encode(sha256(convert_to('sk_ts_raw_salted' || 'ts raw salt', 'UTF8')), 'hex'), 'metadata', '{"ownerId": "ts-raw"}'::jsonb)))), 1::bigint,
          'a key the TypeScript keypal hashed with its salt as it is imports');
SELECT is((keypal_verify('sk_ts_raw_salted')).valid, false, 'but verifies under no keypal salt');
SET LOCAL keypal.typescript_salt = 'ts raw salt';
SELECT is((keypal_verify('sk_ts_raw_salted')).valid, true, 'until keypal.typescript_salt names that salt');
SELECT is((keypal_verify('sk_ts_nothing_raw')).valid, false, '(and nothing else verifies for it)');
RESET keypal.typescript_salt;
SET LOCAL keypal.salt = 'pepper';
RESET keypal.previous_salt;

-- keypal_export
CREATE TEMP TABLE made AS SELECT * FROM keypal_create(owner_id => 'exp', org_id => 'acme', name => 'parent',
    scopes => '{read,write}', rate_limit => '{"requests": 10, "window": "1m"}', quota => '{"limit": 100, "period": "month"}',
    allowed_ips => '{10.0.0.0/8}', notify_before => '3d', expires_in => '30d', metadata => '{"a": null}');
INSERT INTO made SELECT * FROM keypal_create(owner_id => 'exp', org_id => 'acme', scopes => '{read}',
    parent_id => (SELECT id FROM made LIMIT 1), tags => '{child}');
INSERT INTO made SELECT * FROM keypal_create(owner_id => 'exp', org_id => 'other');
CREATE TEMP TABLE ex AS SELECT keypal_export('exp') AS e;
SELECT is(jsonb_array_length((SELECT e FROM ex)), 3, 'keypal_export(owner_id): the owner''s keys');
SELECT is(jsonb_array_length(keypal_export('exp', 'acme')), 2, 'keypal_export(owner_id, org_id): of that org');
SELECT is(jsonb_array_length(keypal_export(org_id => 'acme')), 2, 'keypal_export(org_id => ...) alone');
SELECT is(keypal_export('nobody'), '[]'::jsonb, 'no keys: an empty array');
SELECT is((SELECT count(*) FROM keypal_export_records('exp')), 3::bigint, 'keypal_export_records: one row per key');
SELECT ok(NOT EXISTS (SELECT 1 FROM made m, ex WHERE ex.e::text LIKE '%' || m.key || '%'), 'no plaintext in an export');
SELECT is((SELECT r->>'key_hash' FROM ex, jsonb_array_elements(ex.e) r WHERE r->>'name' = 'parent'),
          (SELECT encode(key_hash, 'hex') FROM keypal.keys WHERE name = 'parent' AND owner_id = 'exp'), 'the hash, as hex');
SELECT is((SELECT r - 'id' - 'key_hash' - 'created_at' - 'updated_at' - 'expires_at' FROM ex, jsonb_array_elements(ex.e) r WHERE r->>'name' = 'parent'),
          '{"name": "parent", "tags": [], "quota": {"limit": 100, "period": "month", "on_exceeded": "block"}, "scopes": ["read", "write"],
            "org_id": "acme", "enabled": true, "signing": false, "metadata": {"a": null}, "owner_id": "exp", "algorithm": "sha256",
            "resources": {}, "rate_limit": {"window": "1m", "requests": 10}, "allowed_ips": ["10.0.0.0/8"], "blocked_ips": [],
            "notify_before": "3 days", "allowed_regions": [], "blocked_regions": []}'::jsonb,
          'every setting, NULL ones left out (a null inside metadata kept)');
SELECT is((SELECT r->>'parent_id' FROM ex, jsonb_array_elements(ex.e) r WHERE r->'tags' ? 'child'),
          (SELECT id::text FROM made LIMIT 1), 'the parent link');
SELECT results_eq($$SELECT (r->>'id')::uuid FROM ex, jsonb_array_elements(ex.e) WITH ORDINALITY AS t(r, n) ORDER BY n$$,
                  $$SELECT id FROM keypal.keys WHERE owner_id = 'exp' ORDER BY created_at, id$$, 'oldest first');

-- on_conflict => overwrite
SELECT keypal_revoke((SELECT id FROM made OFFSET 2 LIMIT 1), 'gone');
CREATE TEMP TABLE changed AS
SELECT jsonb_agg(CASE WHEN r->>'name' = 'parent' THEN r || '{"name": "renamed"}' ELSE r - 'revoked_at' END) AS e
  FROM ex, jsonb_array_elements(ex.e) r;
SELECT results_eq($$SELECT * FROM keypal_import((SELECT e FROM changed), 'overwrite')$$,
                  $$VALUES (0::bigint, 0::bigint, 3::bigint)$$, 'overwrite: every record replaces its key');
SELECT is((SELECT name FROM keypal.keys WHERE id = (SELECT id FROM made LIMIT 1)), 'renamed', 'with the record''s settings');
SELECT is((keypal_verify((SELECT key FROM made OFFSET 2 LIMIT 1))).error_code, 'REVOKED', 'but a revoked key stays revoked');
SELECT is((SELECT revoke_reason FROM keypal.keys WHERE id = (SELECT id FROM made OFFSET 2 LIMIT 1)), 'gone', 'as it was');
SELECT is((SELECT action FROM keypal.audit_log WHERE key_id = (SELECT id FROM made LIMIT 1) ORDER BY id DESC LIMIT 1),
          'imported', 'an overwrite is audited as imported');
SELECT is((keypal_verify((SELECT key FROM made LIMIT 1), scope => 'write', ip => '10.1.2.3')).valid, true, 'the overwritten key verifies');
-- Called from a trigger of the caller's (an import queue), an overwrite is audited as imported
-- all the same, with no event (the audit trigger runs two levels down, not one).
CREATE TABLE public.import_jobs (data jsonb);
CREATE FUNCTION pg_temp.run_import() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM keypal_import(NEW.data, on_conflict => 'overwrite');
    RETURN NULL;
END $$;
CREATE TRIGGER run_import AFTER INSERT ON public.import_jobs FOR EACH ROW EXECUTE FUNCTION pg_temp.run_import();
CREATE TEMP TABLE before_job AS SELECT max(id) AS last FROM keypal.events;
INSERT INTO public.import_jobs
SELECT jsonb_build_array(r || '{"enabled": false}') FROM keypal_export_records('exp') r WHERE (r->>'id')::uuid = (SELECT id FROM made LIMIT 1);
SELECT is((SELECT enabled FROM keypal.keys WHERE id = (SELECT id FROM made LIMIT 1)), false, 'an import run by a trigger overwrites');
SELECT is((SELECT action FROM keypal.audit_log WHERE key_id = (SELECT id FROM made LIMIT 1) ORDER BY id DESC LIMIT 1),
          'imported', 'and is audited as imported');
SELECT is((SELECT count(*) FROM keypal.events WHERE id > (SELECT last FROM before_job)), 0::bigint, 'with no event');
UPDATE keypal.keys SET enabled = true WHERE id = (SELECT id FROM made LIMIT 1);
DROP TABLE public.import_jobs;
-- An overwrite that moves a key under another parent moves its descendants too: refused
-- when the deepest would be past the cap (verify would refuse it for good), as
-- keypal_create refuses a key that deep.
CREATE TEMP TABLE chain (lvl int, id uuid, key text);
DO $$
DECLARE r record; p uuid;
BEGIN
    FOR i IN 1..keypal.max_hierarchy_depth() LOOP
        SELECT * INTO r FROM keypal_create(owner_id => 'deep', scopes => '{read}', parent_id => p);
        INSERT INTO chain VALUES (i, r.id, r.key);
        p := r.id;
    END LOOP;
END $$;
CREATE TEMP TABLE new_root AS SELECT id FROM keypal_create(owner_id => 'deep_other', scopes => '{read}');
SELECT throws_like(format($$SELECT keypal_import(%L, 'overwrite')$$, (SELECT jsonb_agg(r || jsonb_build_object('parent_id', (SELECT id FROM new_root)))
                  FROM keypal_export_records('deep') r WHERE (r->>'id')::uuid = (SELECT id FROM chain WHERE lvl = 1))),
               'invalid data[0].parent_id: a key hierarchy is at most%', 'an overwrite taking a full-depth chain one level down is refused');
SELECT is((SELECT parent_id FROM keypal.keys WHERE id = (SELECT id FROM chain WHERE lvl = 1)), NULL, '(the chain''s root stays a root)');
SELECT is((keypal_verify((SELECT key FROM chain WHERE lvl = keypal.max_hierarchy_depth()))).valid, true, '(and its deepest key verifies)');
SELECT lives_ok(format($$SELECT keypal_import(%L, 'overwrite')$$, (SELECT jsonb_agg(r || jsonb_build_object('parent_id', (SELECT id FROM new_root)))
                  FROM keypal_export_records('deep') r WHERE (r->>'id')::uuid = (SELECT id FROM chain WHERE lvl = 2))),
                'moving the chain''s second key under another root keeps the depth: accepted');
-- An overwrite whose record brings a revoke_at already past and not applied at the source
-- (the record is not revoked): the key's revoke timer is armed for that moment, not dropped,
-- and maintenance writes the revocation down here.
CREATE TEMP TABLE sched AS SELECT id FROM keypal_create(owner_id => 'sched', revoke_at => now() + interval '1 day');
SELECT lives_ok(format($$SELECT keypal_import(%L, 'overwrite')$$, (SELECT jsonb_agg(r || jsonb_build_object('revoke_at', now() - interval '1 hour'))
                  FROM keypal_export_records('sched') r)), 'an overwrite moving revoke_at into the past');
SELECT is((SELECT due_at FROM keypal.key_timers WHERE key_id = (SELECT id FROM sched) AND kind = 'revoke'), now() - interval '1 hour',
          'arms the key''s revoke timer for that moment');
CALL keypal_run_maintenance();
SELECT is((SELECT revoked_at FROM keypal.keys WHERE id = (SELECT id FROM sched)), now() - interval '1 hour',
          'which maintenance applies: the key is revoked as of revoke_at');
SELECT is((SELECT count(*) FROM keypal.audit_log WHERE key_id = (SELECT id FROM sched) AND action = 'revoked'), 1::bigint,
          '(audited)');
SELECT is(tap.err(format($$SELECT keypal_import(%L, 'overwrite')$$, jsonb_build_array(
              (SELECT r FROM ex, jsonb_array_elements(ex.e) r WHERE r->>'name' = 'parent') || jsonb_build_object('id', gen_random_uuid())))),
          '23505', 'overwrite never takes another key''s hash');

-- An overwrite is audited even when the record carries last_used_at (an update of that
-- alone is the worker's kind, unaudited), and never changes a key's hash.
SELECT keypal_verify((SELECT key FROM made LIMIT 1));
CREATE TEMP TABLE used AS SELECT r || jsonb_build_object('last_used_at', '2030-01-01T00:00:00Z', 'name', 'used') AS r
  FROM jsonb_array_elements(keypal_export('exp', 'acme')) r WHERE r->>'id' = (SELECT id::text FROM made LIMIT 1);
SELECT lives_ok(format($$SELECT keypal_import(%L, 'overwrite')$$, (SELECT jsonb_agg(r) FROM used)), 'an overwrite with last_used_at');
SELECT is((SELECT (action, changes->'name'->>'new') FROM keypal.audit_log WHERE key_id = (SELECT id FROM made LIMIT 1) ORDER BY id DESC LIMIT 1),
          ('imported'::text, 'used'::text), 'is audited as imported, with its changes');
SELECT is((SELECT last_used_at FROM keypal.keys WHERE id = (SELECT id FROM made LIMIT 1)), '2030-01-01 00:00:00+00'::timestamptz,
          'and keeps the later last use');
SELECT matches(tap.err(format($$SELECT keypal_import(%L, 'overwrite')$$,
                   (SELECT jsonb_agg(r || jsonb_build_object('key_hash', pg_temp.ts_hash('sk_some_other_key'))) FROM used))),
               '^22023', 'an overwrite that would change the hash is refused (a key''s hash never changes)');

-- rate_limit JSON null (no limit, over the default) survives export and import.
SELECT keypal_update((SELECT id FROM made OFFSET 1 LIMIT 1), rate_limit => 'null');
SELECT is((SELECT r->'rate_limit' FROM jsonb_array_elements(keypal_export('exp')) r WHERE r->>'id' = (SELECT id::text FROM made OFFSET 1 LIMIT 1)),
          'null'::jsonb, 'a rate_limit of JSON null is exported');
SELECT lives_ok($$SELECT keypal_import(keypal_export('exp'), 'overwrite')$$, 'and re-imported');
SELECT is((SELECT rate_limit FROM keypal.keys WHERE id = (SELECT id FROM made OFFSET 1 LIMIT 1)), 'null'::jsonb, 'as JSON null, not SQL NULL');

-- A pending revocation (a rotation's grace) is kept by an overwrite from an older record.
CREATE TEMP TABLE graced AS SELECT keypal_export('grace') AS before, k.* FROM keypal_create(owner_id => 'grace') k;
UPDATE graced SET before = keypal_export('grace');
SELECT keypal_rotate((SELECT id FROM graced), grace => '1h');
SELECT lives_ok($$SELECT keypal_import((SELECT before FROM graced), 'skip')$$, 'skip leaves it');
SELECT lives_ok($$SELECT keypal_import((SELECT before FROM graced), 'overwrite')$$, 'an overwrite from before the rotation');
SELECT is((SELECT (revoked_at > now(), rotated_to IS NOT NULL, revoke_reason) FROM keypal.keys WHERE id = (SELECT id FROM graced)),
          (true, true, 'rotated'::text), 'keeps the pending revocation and the rotation link');

-- Validation: the first bad record raises naming data[i].field; nothing is written.
SELECT keypal_define_policy('xfer:ro2', scopes => '{read}');
CREATE TEMP TABLE before AS SELECT pg_temp.keys() AS k, pg_temp.audits() AS a;
CREATE FUNCTION pg_temp.bad(data jsonb, conflict text DEFAULT 'error') RETURNS text LANGUAGE plpgsql AS $$
DECLARE msg text; st text;
BEGIN
    PERFORM keypal_import(data, conflict);
    RETURN 'no error';
EXCEPTION WHEN others THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT;
    RETURN st || ' ' || msg;
END $$;
CREATE FUNCTION pg_temp.rec(id text, key text, extra jsonb DEFAULT '{}') RETURNS jsonb LANGUAGE sql AS $$
    SELECT jsonb_build_object('id', id, 'key_hash', pg_temp.ts_hash(key), 'owner_id', 'bad') || extra
$$;
CREATE TEMP TABLE u AS SELECT gen_random_uuid() AS a, gen_random_uuid() AS b, gen_random_uuid() AS c;
SELECT matches(pg_temp.bad(jsonb_build_array(pg_temp.rec((SELECT a::text FROM u), 'sk_bad_1'), '{"id": 1}'::jsonb)),
               '^22023 invalid data\[1\]: must hold key_hash', 'a record of neither kind: data[1]');
SELECT matches(pg_temp.bad(jsonb_build_array(pg_temp.rec((SELECT a::text FROM u), 'sk_bad_1'),
                                             pg_temp.rec((SELECT b::text FROM u), 'sk_bad_2', '{"scopes": "read"}'))),
               '^22023 invalid data\[1\]\.scopes: ', 'a bad setting: data[1].scopes');
SELECT matches(pg_temp.bad(jsonb_build_array(pg_temp.rec((SELECT a::text FROM u), 'sk_bad_1') - 'owner_id')),
               '^22023 invalid data\[0\]\.owner_id: is required', 'a missing owner: data[0].owner_id');
SELECT matches(pg_temp.bad(jsonb_build_array(pg_temp.rec((SELECT a::text FROM u), 'sk_bad_1', '{"key_hash": "abcd"}'))),
               '^22023 invalid data\[0\]\.key_hash: must be 64', 'a short hash: data[0].key_hash');
SELECT matches(pg_temp.bad(jsonb_build_array(pg_temp.rec((SELECT a::text FROM u), 'sk_bad_1', '{"revoked_at": "2025-01-01"}'))),
               '^22023 invalid data\[0\]\.revoked_at: .* not a timestamp with a time zone', 'a time without a zone: data[0].revoked_at');
SELECT matches(pg_temp.bad(jsonb_build_array(pg_temp.rec((SELECT a::text FROM u), 'sk_bad_1', '{"notify_before": "soonish"}'))),
               '^22007 invalid duration for data\[0\]\.notify_before', 'a bad duration: data[0].notify_before (22007)');
SELECT matches(pg_temp.bad(jsonb_build_array(pg_temp.rec((SELECT a::text FROM u), 'sk_bad_1'), pg_temp.rec((SELECT a::text FROM u), 'sk_bad_2'))),
               '^22023 invalid data\[1\]\.id: the same id as data\[0\]', 'an id twice: data[1].id');
SELECT matches(pg_temp.bad(jsonb_build_array(pg_temp.rec((SELECT a::text FROM u), 'sk_bad_1'), pg_temp.rec((SELECT b::text FROM u), 'sk_bad_1'))),
               '^22023 invalid data\[1\]\.key_hash: the same key_hash as data\[0\]', 'a hash twice: data[1].key_hash');
SELECT matches(pg_temp.bad(jsonb_build_array(pg_temp.rec((SELECT a::text FROM u), 'sk_bad_1', '{"policy": "no such"}'))),
               '^22023 invalid data\[0\]\.policy: no policy named', 'an unknown policy: data[0].policy');
SELECT matches(pg_temp.bad(jsonb_build_array(pg_temp.rec((SELECT a::text FROM u), 'sk_bad_1', jsonb_build_object('parent_id', (SELECT c FROM u))))),
               '^23503 invalid data\[0\]\.parent_id: no key .* in the data or in this database', 'a missing parent: data[0].parent_id (23503)');
SELECT matches(pg_temp.bad(jsonb_build_array(pg_temp.rec((SELECT a::text FROM u), 'sk_bad_1', jsonb_build_object('rotated_to', (SELECT a FROM u))))),
               '^22023 invalid data\[0\]\.rotated_to: a key cannot name itself', 'a key naming itself');
SELECT matches(pg_temp.bad(jsonb_build_array(pg_temp.rec((SELECT a::text FROM u), 'sk_bad_1', jsonb_build_object('parent_id', (SELECT b FROM u))),
                                             pg_temp.rec((SELECT b::text FROM u), 'sk_bad_2', jsonb_build_object('parent_id', (SELECT a FROM u))))),
               '^22023 invalid data\[0\]\.parent_id: a key hierarchy is at most', 'a parent cycle: refused after the writes, all undone');
SELECT matches(pg_temp.bad(jsonb_build_array(pg_temp.rec((SELECT a::text FROM u), 'sk_bad_1', '{"created_at": "2025-01-15T10:30:00+16"}'))),
               '^22023 invalid data\[0\]\.created_at: ', 'a zone offset PostgreSQL refuses: data[0].created_at');
SELECT matches(pg_temp.bad(jsonb_build_array(pg_temp.rec((SELECT a::text FROM u), 'sk_bad_1', '{"metadata": {"x": 1e400}}'))),
               '^22023 invalid data\[0\]: cannot be read', 'a number beyond a double: data[0]');
SELECT matches(pg_temp.bad(jsonb_build_array(pg_temp.rec((SELECT a::text FROM u), 'sk_bad_1',
                   jsonb_build_object('parent_id', (SELECT id FROM made OFFSET 1 LIMIT 1), 'scopes', '["admin"]'::jsonb)))),
               '^22023 invalid data\[0\]\.parent_id: a child key''s scopes must be within', 'a child outside its parent''s scopes');
SELECT matches(pg_temp.bad(jsonb_build_array(
                   (SELECT r || '{"scopes": []}' FROM jsonb_array_elements(keypal_export('exp')) r WHERE r->>'id' = (SELECT id::text FROM made LIMIT 1))), 'overwrite'),
               '^22023 invalid data\[0\]\.scopes: key .*, a child of this one', 'an overwrite that narrows a parent below its live child');
SELECT matches(pg_temp.bad(jsonb_build_array(pg_temp.rec((SELECT a::text FROM u), 'sk_ts_live_one'),
                   pg_temp.rec((SELECT b::text FROM u), 'sk_bad_2', jsonb_build_object('parent_id', (SELECT a FROM u)))), 'skip'),
               '^23503 invalid data\[1\]\.parent_id: key .* is in the data but skipped', 'skip: a link to a record skipped (its hash is another key''s) is named');
SELECT matches(pg_temp.bad('{"keys": []}'), '^22023 invalid data: must be a JSON array', 'data must be an array');
SELECT matches(pg_temp.bad('[]', 'merge'), '^22023 invalid on_conflict: ''merge''', 'on_conflict is skip, overwrite or error');
SELECT matches(pg_temp.bad(jsonb_build_array(pg_temp.rec((SELECT a::text FROM u), 'sk_bad_1'), pg_temp.rec((SELECT b::text FROM u), 'sk_ts_live_one'))),
               '^23505 invalid data\[1\]\.key_hash: key .* already has this hash', 'a hash another key holds: 23505');
SELECT results_eq($$SELECT pg_temp.keys(), pg_temp.audits()$$, $$SELECT k, a FROM before$$,
                  'after every refusal: no key and no audit row written');
SELECT is((SELECT count(*) FROM pg_class WHERE relname = 'keypal import'), 0::bigint, 'nor a work table left behind');
SELECT results_eq($$SELECT * FROM keypal_import('[]')$$, $$VALUES (0::bigint, 0::bigint, 0::bigint)$$, 'an empty array imports nothing');

-- States keypal allows import as they are: a key made under an earlier definition of its
-- policy; a live child under a revoked parent (verify judges the ancestor).
SELECT is(pg_temp.bad(jsonb_build_array(pg_temp.rec((SELECT a::text FROM u), 'sk_bad_1', '{"policy": "xfer:ro2", "scopes": ["write"]}'))),
          'no error', 'a key outside its policy''s current definition imports (policies bind create and update)');
SELECT is(pg_temp.bad(jsonb_build_array(pg_temp.rec((SELECT b::text FROM u), 'sk_child_of_revoked',
              jsonb_build_object('parent_id', (SELECT id FROM made OFFSET 2 LIMIT 1))))),
          'no error', 'a live child of a revoked key imports');
SELECT is((keypal_verify('sk_child_of_revoked')).error_code, 'REVOKED', 'and verifies as its revoked ancestor makes it');
SELECT is(pg_temp.bad(jsonb_build_array(pg_temp.rec((SELECT c::text FROM u), 'sk_meta_null', '{"metadata": null}'))),
          'no error', 'a record with metadata null imports');

-- Privileges: management only.
SET LOCAL ROLE keypal_plain;
SELECT throws_ok($$SELECT keypal_export()$$, '42501', NULL, 'PUBLIC may not export');
SELECT throws_ok($$SELECT keypal_import('[]')$$, '42501', NULL, 'nor import');
SELECT throws_ok($$SELECT keypal.import_row('{}', 0)$$, '42501', NULL, 'nor call the record check');
RESET ROLE;

SELECT * FROM finish();
ROLLBACK;
