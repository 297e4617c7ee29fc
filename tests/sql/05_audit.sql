-- Audit log (by trigger, append-only), actor resolution, keypal_audit and keypal_audit_stats;
-- the events outbox written beside it.
BEGIN;
SELECT no_plan();

CREATE TEMP TABLE k AS SELECT key, id FROM keypal_create(owner_id => 'aud', org_id => 'org_a', scopes => '{read}', actor => 'creator');
CREATE FUNCTION pg_temp.id() RETURNS uuid LANGUAGE sql AS $$ SELECT id FROM k $$;
SELECT keypal_update(pg_temp.id(), name => 'renamed');
SET LOCAL keypal.actor = 'from_guc';
SELECT keypal_disable(pg_temp.id());
RESET keypal.actor;
SELECT keypal_enable(pg_temp.id(), actor => 'enabler');
INSERT INTO k SELECT key, id FROM keypal_rotate(pg_temp.id(), grace => '1h', actor => 'rotator');

SELECT results_eq(
    $$SELECT action, actor FROM keypal_audit(key_id => (SELECT id FROM k ORDER BY id = pg_temp.id() DESC LIMIT 1)) ORDER BY id$$,
    $$VALUES ('created', 'creator'), ('updated', 'postgres'), ('disabled', 'from_guc'), ('enabled', 'enabler'), ('rotated', 'rotator')$$,
    'each change audited with its actor: argument, then keypal.actor, then current_user');
SELECT is((SELECT changes->'name'->>'new' FROM keypal_audit(key_id => pg_temp.id(), action => 'updated')), 'renamed', 'changes carry old and new values');
SELECT ok((SELECT bool_and(NOT (changes ? 'key_hash')) FROM keypal_audit(owner_id => 'aud') WHERE changes IS NOT NULL), 'changes never include the hash');
SELECT is((SELECT count(*) FROM keypal_audit(owner_id => 'aud', action => 'created')), 2::bigint, 'filter by action (the rotated copy is created too)');
SELECT is((SELECT context->>'rotated_from' FROM keypal_audit(owner_id => 'aud', action => 'created', "limit" => 1)), pg_temp.id()::text, 'the copy''s creation names what it was rotated from');
SELECT is((SELECT count(*) FROM keypal_audit(org_id => 'org_a')), 6::bigint, 'filter by org');
SELECT is((SELECT count(*) FROM keypal_audit(owner_id => 'aud', since => now() + interval '1 minute')), 0::bigint, 'since');
SELECT is((SELECT count(*) FROM keypal_audit(owner_id => 'aud', until => now() - interval '1 minute')), 0::bigint, 'until');
SELECT is((SELECT count(*) FROM keypal_audit(owner_id => 'aud', "limit" => 2)), 2::bigint, 'limit');
SELECT is((SELECT count(*) FROM keypal_audit(owner_id => 'aud', "offset" => 5)), 1::bigint, 'offset');
SELECT ok((SELECT bool_and(ordered) FROM (SELECT id < lag(id) OVER (ORDER BY at DESC, id DESC) OR lag(id) OVER (ORDER BY at DESC, id DESC) IS NULL AS ordered FROM keypal_audit(owner_id => 'aud')) t), 'newest first');
SELECT throws_ok($$SELECT * FROM keypal_audit(action => 'exploded')$$, '22023', NULL, 'unknown action: 22023');
SELECT throws_ok($$SELECT * FROM keypal_audit("limit" => -1)$$, '22023', NULL, 'negative limit: 22023');
SELECT throws_ok($$SELECT * FROM keypal_audit("offset" => -1)$$, '22023', NULL, 'negative offset: 22023');

SELECT results_eq($$SELECT total, by_action FROM keypal_audit_stats(owner_id => 'aud')$$,
    $$VALUES (6::bigint, '{"created": 2, "updated": 1, "disabled": 1, "enabled": 1, "rotated": 1}'::jsonb)$$, 'audit_stats');
SELECT ok((SELECT last_activity IS NOT NULL FROM keypal_audit_stats(owner_id => 'aud')), 'last_activity');
SELECT is((SELECT total FROM keypal_audit_stats(owner_id => 'nobody')), 0::bigint, 'stats of nobody: 0');

-- Events: one outbox row per change, in the same transaction, with the webhook body.
SELECT is((SELECT count(*) FROM keypal.events WHERE key_id = pg_temp.id()), 5::bigint, 'created, updated, disabled, enabled, rotated events');
SELECT results_eq($$SELECT payload->>'event', payload->'data'->>'ownerId', payload ? 'timestamp' FROM keypal.events WHERE key_id = pg_temp.id() ORDER BY id LIMIT 1$$,
    $$VALUES ('key.created', 'aud', true)$$, 'event payload');

-- keypal_create records its own keys (src/audit.rs); the INSERT trigger records every other
-- INSERT, such as the owner's own: the same audit row and event.
SELECT is(keypal.audit_written(), false, 'outside keypal.create_keys, the INSERT trigger records');
INSERT INTO keypal.keys (id, key_hash, algorithm, owner_id, name, org_id, env)
VALUES ('00000000-0000-4000-8000-00000000a0d1', '\x01', 'sha256', 'direct', 'by hand', 'o1', 'live');
SELECT results_eq($$SELECT action, owner_id, org_id, actor = current_user FROM keypal.audit_log WHERE key_id = '00000000-0000-4000-8000-00000000a0d1'$$,
    $$VALUES ('created', 'direct', 'o1', true)$$, 'a direct INSERT is audited by the trigger');
CREATE TEMP TABLE made_here AS SELECT * FROM keypal_create(owner_id => 'direct', name => 'by hand', org_id => 'o1', env => 'live');
SELECT results_eq($$SELECT a.action, a.owner_id, a.org_id, a.actor, a.role, a.context FROM keypal.audit_log a WHERE a.key_id = (SELECT id FROM made_here)$$,
    $$SELECT a.action, a.owner_id, a.org_id, a.actor, a.role, a.context FROM keypal.audit_log a WHERE a.key_id = '00000000-0000-4000-8000-00000000a0d1'$$,
    'keypal_create writes the audit row the trigger writes');
SELECT results_eq($$SELECT e.event, (e.payload->'data') - 'keyId' FROM keypal.events e WHERE e.key_id = (SELECT id FROM made_here)$$,
    $$SELECT e.event, (e.payload->'data') - 'keyId' FROM keypal.events e WHERE e.key_id = '00000000-0000-4000-8000-00000000a0d1'$$,
    'and the event the trigger writes');
-- and so for a key of nothing but its owner (the event leaves out what it has not)
INSERT INTO keypal.keys (id, key_hash, algorithm, owner_id)
VALUES ('00000000-0000-4000-8000-00000000a0d2', '\x02', 'sha256', 'direct');
CREATE TEMP TABLE made_bare AS SELECT * FROM keypal_create(owner_id => 'direct');
SELECT results_eq($$SELECT a.action, a.owner_id, a.org_id, a.actor, a.role, a.context, e.event, (e.payload->'data') - 'keyId'
                      FROM keypal.audit_log a JOIN keypal.events e USING (key_id) WHERE a.key_id = (SELECT id FROM made_bare)$$,
    $$SELECT a.action, a.owner_id, a.org_id, a.actor, a.role, a.context, e.event, (e.payload->'data') - 'keyId'
        FROM keypal.audit_log a JOIN keypal.events e USING (key_id) WHERE a.key_id = '00000000-0000-4000-8000-00000000a0d2'$$,
    'a key of nothing but its owner: the same audit row and event as the trigger''s');
-- keypal_create writes a new key's audit row and event from the values it inserts (one
-- statement: src/create.rs CREATE_ONE), which holds only while nothing can change the row
-- on its way in
SELECT is((SELECT count(*) FROM pg_trigger WHERE tgrelid = 'keypal.keys'::regclass AND NOT tgisinternal
             AND tgtype::int & 7 = 7), 0::bigint, 'keypal.keys has no BEFORE INSERT row trigger');
DO $$ BEGIN PERFORM keypal_create(owner_id => 'direct', name => 'performed'); END $$;
SELECT results_eq($$SELECT (SELECT count(*) FROM keypal.audit_log a WHERE a.key_id = k.id),
                           (SELECT count(*) FROM keypal.events e WHERE e.key_id = k.id)
                      FROM keypal.keys k WHERE k.name = 'performed'$$,
    $$VALUES (1::bigint, 1::bigint)$$, 'PERFORM keypal_create: one key, one audit row, one event');
DELETE FROM keypal.keys WHERE owner_id = 'direct';

-- Direct writes to keypal.keys (by the owner) are audited too; DELETE is 'deleted'.
CREATE TEMP TABLE gone AS SELECT id FROM k WHERE id <> pg_temp.id();
DELETE FROM keypal.keys WHERE id = (SELECT id FROM gone);
SELECT is((SELECT action FROM keypal_audit(key_id => (SELECT id FROM gone), "limit" => 1)), 'deleted', 'deleting a key is audited');

-- Append-only: nobody but the extension's owner may change or delete a row.
GRANT UPDATE, DELETE ON keypal.audit_log TO keypal_admin;
GRANT USAGE ON SCHEMA keypal TO keypal_admin;
SET LOCAL ROLE keypal_admin;
SELECT throws_ok($$UPDATE keypal.audit_log SET actor = 'forged'$$, '42501', NULL, 'even with UPDATE granted, audit rows cannot be changed');
SELECT throws_ok($$DELETE FROM keypal.audit_log$$, '42501', NULL, 'or deleted');
RESET ROLE;

-- A key's audit row and event are written by the statement that makes it, or none of the
-- three is: an audit row the table refuses takes the key and its event with it (one key, and
-- a call of several whose second fails).
ALTER TABLE keypal.audit_log ADD CONSTRAINT audit_refuses CHECK (owner_id IS DISTINCT FROM 'refused');
SELECT throws_ok($$SELECT keypal_create(owner_id => 'refused')$$, '23514', NULL, 'an audit row refused fails the create');
SELECT throws_ok($$SELECT keypal_create_many('[{"owner_id": "kept?"}, {"owner_id": "refused"}]')$$, '23514', NULL,
    'and a create of several');
SELECT is((SELECT count(*) FROM keypal.keys WHERE owner_id IN ('refused', 'kept?')), 0::bigint, 'no key is left');
SELECT is((SELECT count(*) FROM keypal.events WHERE payload -> 'data' ->> 'ownerId' IN ('refused', 'kept?')), 0::bigint,
    'nor an event');
-- However the failed create ended, the flag that keeps the INSERT trigger off for its own
-- keys is down again: a later direct INSERT is audited by the trigger.
SELECT is(keypal.audit_written(), false, 'after a failed create, the INSERT trigger is on again');
ALTER TABLE keypal.audit_log DROP CONSTRAINT audit_refuses;
INSERT INTO keypal.keys (id, key_hash, algorithm, owner_id)
VALUES ('00000000-0000-4000-8000-00000000a0d3', sha256('after a failure'), 'sha256', 'after_failure');
SELECT is((SELECT count(*) FROM keypal.audit_log WHERE key_id = '00000000-0000-4000-8000-00000000a0d3' AND action = 'created'),
    1::bigint, 'and audits a direct INSERT');

-- An UPDATE of last_used_at alone (a use, not a change) is not audited; one that changes
-- other columns too is, for those; a new key_hash is audited without the hash.
-- (an expiry of March 31: one month before is February 28, 30 days before is March 1)
CREATE TEMP TABLE used AS SELECT id FROM keypal_create(owner_id => 'used', expires_at => '2099-03-31 12:00+00', notify_before => '30d');
ALTER TABLE keypal.keys DISABLE TRIGGER keys_updated_at;
UPDATE keypal.keys SET updated_at = '2000-01-01 00:00+00' WHERE id = (SELECT id FROM used);
ALTER TABLE keypal.keys ENABLE TRIGGER keys_updated_at;
UPDATE keypal.keys SET last_used_at = now() WHERE id = (SELECT id FROM used);
SELECT is((SELECT count(*) FROM keypal.audit_log WHERE key_id = (SELECT id FROM used) AND action <> 'created'), 0::bigint,
    'a write of last_used_at alone is not audited');
SELECT is((SELECT updated_at FROM keypal.keys WHERE id = (SELECT id FROM used)), '2000-01-01 00:00+00'::timestamptz,
    'nor moves updated_at');
UPDATE keypal.keys SET enabled = false, last_used_at = now() + interval '1 minute' WHERE id = (SELECT id FROM used);
SELECT is((SELECT updated_at FROM keypal.keys WHERE id = (SELECT id FROM used)), now(),
    'one that also changes enabled moves updated_at');
SELECT is((SELECT changes FROM keypal.audit_log WHERE key_id = (SELECT id FROM used) AND action = 'disabled'),
    '{"enabled": {"new": false, "old": true}}'::jsonb, 'one that also changes enabled is audited, for enabled');
SELECT is((SELECT count(*) FROM keypal.events WHERE key_id = (SELECT id FROM used) AND event = 'key.disabled'), 1::bigint,
    'with its event');
-- A key's id never changes: the audit pairs a statement's old and new rows by id, so such an
-- UPDATE (the table owner's) would be audited as nothing.
CREATE TEMP TABLE renumbered AS SELECT id FROM keypal_create(owner_id => 'renumbered');
SELECT throws_ok($$UPDATE keypal.keys SET id = '00000000-0000-4000-8000-00000000a0d4' WHERE id = (SELECT id FROM renumbered)$$,
    '0A000', NULL, 'an UPDATE of a key''s id fails (0A000)');
SELECT is((SELECT count(*) FROM keypal.keys WHERE id = (SELECT id FROM renumbered)), 1::bigint, '(the key keeps its id)');
SELECT is((SELECT count(*) FROM keypal.audit_log WHERE owner_id = 'renumbered'), 1::bigint, '(its one audit row, created)');
UPDATE keypal.keys SET key_hash = sha256('a new hash') WHERE id = (SELECT id FROM used);
SELECT is((SELECT changes FROM keypal.audit_log WHERE key_id = (SELECT id FROM used) AND action = 'updated'),
    '{"key_hash": "changed"}'::jsonb, 'a new key_hash is audited, the hash not written down');
-- '1 mon' = '30 days' as intervals, not as the moment before an expiry: a change of one
-- for the other is audited, and moves the key.expiring timer.
SELECT lives_ok($$SELECT keypal_update((SELECT id FROM used), notify_before => '1 mon')$$, 'notify_before 30 days -> 1 mon');
SELECT is((SELECT changes FROM keypal.audit_log WHERE key_id = (SELECT id FROM used) AND action = 'updated'
            ORDER BY id DESC LIMIT 1),
    '{"notify_before": {"new": "1 mon", "old": "30 days"}}'::jsonb, 'is audited');
SELECT is((SELECT due_at FROM keypal.key_timers WHERE key_id = (SELECT id FROM used) AND kind = 'expiring'),
    (SELECT expires_at - interval '1 mon' FROM keypal.keys WHERE id = (SELECT id FROM used)), 'and moves the expiring timer');

-- keypal_create's result is the five columns of keypal.created_key: an altered type is
-- refused (its values would be read as the wrong types).
SAVEPOINT altered;
ALTER TYPE keypal.created_key ADD ATTRIBUTE extra integer;
SELECT throws_ok($$SELECT * FROM keypal_create(owner_id => 'altered')$$, '42804', NULL, 'a result type of six columns is refused');
ROLLBACK TO SAVEPOINT altered;
ALTER TYPE keypal.created_key ALTER ATTRIBUTE id TYPE text;
SELECT throws_ok($$SELECT * FROM keypal_create(owner_id => 'altered')$$, '42804', NULL, 'and one of other types');
ROLLBACK TO SAVEPOINT altered;

-- With a BEFORE INSERT row trigger on keypal.keys (a DBA's), one key's audit row and event
-- tell the row as the trigger left it, not as given.
CREATE FUNCTION pg_temp.renamed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.name := 'by the trigger';
    RETURN NEW;
END $$;
CREATE TRIGGER renamed BEFORE INSERT ON keypal.keys FOR EACH ROW EXECUTE FUNCTION pg_temp.renamed();
CREATE TEMP TABLE by_trigger AS SELECT id FROM keypal_create(owner_id => 'by_trigger', name => 'given');
SELECT is((SELECT payload -> 'data' ->> 'name' FROM keypal.events WHERE key_id = (SELECT id FROM by_trigger)), 'by the trigger',
    'with a BEFORE INSERT trigger, the event tells the row as written');
SELECT is((SELECT count(*) FROM keypal.audit_log WHERE key_id = (SELECT id FROM by_trigger)), 1::bigint, 'one audit row');
DROP TRIGGER renamed ON keypal.keys;
-- With an INSERT rule on keypal.keys (a DBA's mirror), keypal_create still works (PostgreSQL
-- refuses a DO ALSO rule in a WITH's INSERT: one key then takes the several-key path).
CREATE TABLE public.key_mirror (id uuid);
CREATE RULE mirrored AS ON INSERT TO keypal.keys DO ALSO INSERT INTO public.key_mirror VALUES (NEW.id);
SELECT lives_ok($$CREATE TEMP TABLE by_rule AS SELECT id FROM keypal_create(owner_id => 'by_rule')$$,
    'with an INSERT rule on keypal.keys, keypal_create makes its key');
SELECT is((SELECT count(*) FROM public.key_mirror WHERE id = (SELECT id FROM by_rule)), 1::bigint, '(the rule ran)');
SELECT is((SELECT count(*) FROM keypal.audit_log WHERE key_id = (SELECT id FROM by_rule) AND action = 'created'), 1::bigint,
    'one audit row');
SELECT is((SELECT count(*) FROM keypal.events WHERE key_id = (SELECT id FROM by_rule) AND event = 'key.created'), 1::bigint,
    'one event');
DROP RULE mirrored ON keypal.keys;
DROP TABLE public.key_mirror;

SELECT * FROM finish();
ROLLBACK;
