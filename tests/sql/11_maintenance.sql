-- Schedules and maintenance (SPEC §3): timers kept by trigger, CALL keypal_run_maintenance()
-- applying disable_at / revoke_at (state, audit, events, cascade), key.expiring and
-- key.expired once each, quota periods reset, pruning per retention. Inside this test's
-- transaction block the procedure cannot commit: it does all its batches in it.
-- Concurrent runs, the worker's own runs and pg_cron: tests/shell/maintenance.t, pg_cron.t.
BEGIN;
SELECT no_plan();

CREATE TEMP TABLE k (name text PRIMARY KEY, id uuid);
INSERT INTO k SELECT 'sched', id FROM keypal_create(owner_id => 'maint', expires_in => '30d', notify_before => '7d',
                                                   disable_at => now() + interval '10 days', revoke_at => now() + interval '20 days');
SELECT set_eq($$SELECT kind, due_at FROM keypal.key_timers WHERE key_id = (SELECT id FROM k WHERE name = 'sched')$$,
    $$SELECT * FROM (VALUES ('disable', now() + interval '10 days'), ('revoke', now() + interval '20 days'),
                            ('expiring', (SELECT expires_at - interval '7 days' FROM keypal.keys WHERE id = (SELECT id FROM k WHERE name = 'sched'))),
                            ('expired', (SELECT expires_at FROM keypal.keys WHERE id = (SELECT id FROM k WHERE name = 'sched')))) v$$,
    'creating a key arms a timer per schedule');
SELECT keypal_update((SELECT id FROM k WHERE name = 'sched'), expires_at => now() + interval '60 days') IS NOT NULL AS upd;
SELECT is((SELECT due_at FROM keypal.key_timers WHERE key_id = (SELECT id FROM k WHERE name = 'sched') AND kind = 'expired'),
          now() + interval '60 days', 'changing expires_at moves its timers');
SELECT is((SELECT due_at FROM keypal.key_timers WHERE key_id = (SELECT id FROM k WHERE name = 'sched') AND kind = 'expiring'),
          now() + interval '53 days', 'the notice too');
SELECT keypal_disable((SELECT id FROM k WHERE name = 'sched'));
SELECT ok(NOT EXISTS (SELECT 1 FROM keypal.key_timers WHERE key_id = (SELECT id FROM k WHERE name = 'sched') AND kind = 'disable'),
          'a disabled key has no disable timer');
SELECT keypal_enable((SELECT id FROM k WHERE name = 'sched'));
SELECT ok(EXISTS (SELECT 1 FROM keypal.key_timers WHERE key_id = (SELECT id FROM k WHERE name = 'sched') AND kind = 'disable'),
          'enabled again: armed again');
SELECT keypal_revoke((SELECT id FROM k WHERE name = 'sched'));
SELECT ok(NOT EXISTS (SELECT 1 FROM keypal.key_timers WHERE key_id = (SELECT id FROM k WHERE name = 'sched')),
          'a revoked key has no timers');
SELECT ok(NOT EXISTS (SELECT 1 FROM keypal.key_timers t JOIN keypal.keys kk ON kk.id = t.key_id
                       WHERE kk.expires_at IS NULL AND kk.disable_at IS NULL AND kk.revoke_at IS NULL),
          'a key without schedules has none');

-- Nothing due: nothing done
SELECT is(keypal_maintenance_step(), false, 'keypal_maintenance_step: nothing left to do');
SELECT is(tap.err($$SELECT keypal_maintenance_step(0)$$), '22023', 'batch_size must be positive');

-- Due schedules. The keys are created with schedules ahead, then moved into the past (as
-- time would), committed state being what maintenance sees.
INSERT INTO k SELECT 'parent', id FROM keypal_create(owner_id => 'maint', scopes => '{read}', revoke_at => now() + interval '1 day');
INSERT INTO k SELECT 'child', id FROM keypal_create(owner_id => 'maint', scopes => '{read}', parent_id => (SELECT id FROM k WHERE name = 'parent'));
INSERT INTO k SELECT 'off', id FROM keypal_create(owner_id => 'maint', disable_at => now() + interval '1 day');
INSERT INTO k SELECT 'soon', id FROM keypal_create(owner_id => 'maint', expires_in => '1h', notify_before => '2h');
INSERT INTO k SELECT 'gone', id FROM keypal_create(owner_id => 'maint', expires_in => '1d');
UPDATE keypal.keys SET revoke_at = clock_timestamp() - interval '1 second' WHERE id = (SELECT id FROM k WHERE name = 'parent');
UPDATE keypal.keys SET disable_at = clock_timestamp() - interval '1 second' WHERE id = (SELECT id FROM k WHERE name = 'off');
UPDATE keypal.keys SET expires_at = clock_timestamp() - interval '1 second' WHERE id = (SELECT id FROM k WHERE name = 'gone');
CREATE TEMP TABLE before AS SELECT coalesce(max(id), 0) AS ev FROM keypal.events;
CREATE TEMP TABLE before_audit AS SELECT coalesce(max(id), 0) AS au FROM keypal.audit_log;

CALL keypal_run_maintenance();

SELECT is((SELECT revoked_at = revoke_at FROM keypal.keys WHERE id = (SELECT id FROM k WHERE name = 'parent')), true,
          'revoke_at: revoked, as of revoke_at');
SELECT is((SELECT revoke_reason FROM keypal.keys WHERE id = (SELECT id FROM k WHERE name = 'parent')), 'scheduled (revoke_at)', 'with a reason');
SELECT ok((SELECT revoked_at IS NOT NULL FROM keypal.keys WHERE id = (SELECT id FROM k WHERE name = 'child')), 'its child is revoked too');
SELECT is((SELECT array_agg(a.key_id = (SELECT id FROM k WHERE name = 'parent') ORDER BY a.id) FROM keypal.audit_log a
            WHERE a.id > (SELECT au FROM before_audit) AND a.action = 'revoked' AND a.actor = 'schedule'),
          ARRAY[true, false], 'audited (actor schedule), parent then child');
SELECT is((SELECT count(*) FROM keypal.events e WHERE e.id > (SELECT ev FROM before) AND e.event = 'key.revoked'
            AND e.key_id IN (SELECT id FROM k WHERE name IN ('parent', 'child'))), 2::bigint, 'a key.revoked event each');
SELECT is((SELECT enabled FROM keypal.keys WHERE id = (SELECT id FROM k WHERE name = 'off')), false, 'disable_at: disabled');
SELECT is((SELECT count(*) FROM keypal.audit_log a WHERE a.id > (SELECT au FROM before_audit) AND a.action = 'disabled'
            AND a.key_id = (SELECT id FROM k WHERE name = 'off')), 1::bigint, 'audited');
SELECT is((SELECT count(*) FROM keypal.events e WHERE e.id > (SELECT ev FROM before) AND e.event = 'key.disabled'
            AND e.key_id = (SELECT id FROM k WHERE name = 'off')), 1::bigint, 'a key.disabled event');
SELECT ok(keypal_enable((SELECT id FROM k WHERE name = 'off')), 'keypal_enable undoes a scheduled disable');
SELECT ok((keypal_get((SELECT id FROM k WHERE name = 'off'))).enabled, 'enabled again');
SELECT is((SELECT count(*) FROM keypal.events e WHERE e.id > (SELECT ev FROM before) AND e.event = 'key.expiring'
            AND e.key_id = (SELECT id FROM k WHERE name = 'soon')), 1::bigint, 'notify_before reached: key.expiring');
SELECT is((SELECT payload->'data'->>'expiresAt' IS NOT NULL FROM keypal.events e WHERE e.id > (SELECT ev FROM before)
            AND e.event = 'key.expiring'), true, 'the event says when');
SELECT is((SELECT count(*) FROM keypal.events e WHERE e.id > (SELECT ev FROM before) AND e.event = 'key.expired'
            AND e.key_id = (SELECT id FROM k WHERE name = 'gone')), 1::bigint, 'expired: key.expired');
SELECT is((SELECT count(*) FROM keypal.audit_log a WHERE a.id > (SELECT au FROM before_audit) AND a.action = 'expired'
            AND a.key_id = (SELECT id FROM k WHERE name = 'gone')), 1::bigint, 'and an expired audit row');

-- Idempotent
CREATE TEMP TABLE counts AS SELECT (SELECT count(*) FROM keypal.events) AS ev, (SELECT count(*) FROM keypal.audit_log) AS au;
CALL keypal_run_maintenance();
CALL keypal_run_maintenance(batch_size => 1);
SELECT is((SELECT count(*) FROM keypal.events), (SELECT ev FROM counts), 'run again: no new event');
SELECT is((SELECT count(*) FROM keypal.audit_log), (SELECT au FROM counts), 'nor audit row');

-- A new expiry is a new notice
UPDATE keypal.keys SET expires_at = clock_timestamp() - interval '1 second' WHERE id = (SELECT id FROM k WHERE name = 'soon');
CALL keypal_run_maintenance();
SELECT is((SELECT count(*) FROM keypal.events e WHERE e.event = 'key.expired' AND e.key_id = (SELECT id FROM k WHERE name = 'soon')),
          1::bigint, 'expires_at moved into the past: key.expired for it');
SELECT is((SELECT count(*) FROM keypal.events e WHERE e.event = 'key.expiring' AND e.key_id = (SELECT id FROM k WHERE name = 'soon')),
          1::bigint, 'and no late key.expiring for an expiry already passed');

-- Quota periods that rolled over
INSERT INTO k SELECT 'quota', id FROM keypal_create(owner_id => 'maint', quota => '{"limit": 100, "period": "day"}');
INSERT INTO keypal.quota_usage (key_id, period_start, used)
VALUES ((SELECT id FROM k WHERE name = 'quota'), date_trunc('day', now(), 'UTC') - interval '2 days', 42);
SELECT is((SELECT resets_at FROM keypal.quota_usage WHERE key_id = (SELECT id FROM k WHERE name = 'quota')),
          date_trunc('day', now(), 'UTC') - interval '1 day', 'resets_at follows the key''s period');
CALL keypal_run_maintenance();
SELECT is((SELECT (used, period_start, resets_at) FROM keypal.quota_usage WHERE key_id = (SELECT id FROM k WHERE name = 'quota')),
          (0::bigint, date_trunc('day', now(), 'UTC'), date_trunc('day', now(), 'UTC') + interval '1 day'),
          'a period that rolled over starts again at 0');

-- Retention
INSERT INTO keypal.events (at, event, key_id, payload) VALUES (now() - interval '31 days', 'key.updated', NULL, '{}');
INSERT INTO keypal.usage (key_id, hour, requests) VALUES ((SELECT id FROM k WHERE name = 'quota'), now() - interval '401 days', 1);
INSERT INTO keypal.audit_log (at, action, key_id) VALUES (now() - interval '900 days', 'updated', NULL);
CALL keypal_run_maintenance();
SELECT is((SELECT count(*) FROM keypal.events WHERE at < now() - interval '30 days'), 0::bigint, 'events older than 30 days are pruned');
SELECT is((SELECT count(*) FROM keypal.usage WHERE hour < now() - interval '400 days'), 0::bigint, 'usage older than 400 days');
SELECT is((SELECT count(*) FROM keypal.audit_log WHERE at < now() - interval '899 days'), 1::bigint, 'the audit log is kept by default');
SELECT is(keypal_configure(retention => '{"audit_log": "2y", "events": null}')->'retention',
          '{"usage": "400d", "audit_log": "2y", "webhook_deliveries": "30d"}'::jsonb, 'retention merges; null keeps a table for good');
CALL keypal_run_maintenance();
SELECT is((SELECT count(*) FROM keypal.audit_log WHERE at < now() - interval '899 days'), 0::bigint, 'with a retention, it is pruned');
SELECT is(keypal_configure(audit_retention => '')->'retention' ? 'audit_log', false, 'audit_retention => '''' keeps it again');
SELECT is(tap.err($$SELECT keypal_configure(retention => '{"keys": "1d"}')$$), '22023', 'an unknown table: 22023');
SELECT is(tap.err($$SELECT keypal_configure(retention => '{"events": "soon"}')$$), '22007', 'a bad duration: 22007');
SELECT is(tap.err($$SELECT keypal_configure(retention => '[1]')$$), '22023', 'not an object: 22023');

-- Privileges
SET LOCAL ROLE keypal_plain;
SELECT throws_ok($$CALL keypal_run_maintenance()$$, '42501', NULL, 'a plain role cannot run maintenance');
SELECT throws_ok($$SELECT keypal_maintenance_step()$$, '42501', NULL, 'nor a step of it');
RESET ROLE;

SELECT * FROM finish();
ROLLBACK;
