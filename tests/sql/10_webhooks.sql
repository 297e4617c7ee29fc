-- Webhooks (SPEC §3 Events): management, validation, the secret's secrecy, what each event
-- queues, redelivery, privileges. Delivery itself (the worker, a real receiver) is in
-- tests/shell/webhooks.t.
BEGIN;
SELECT no_plan();

-- Add, list
SELECT ok(keypal_add_webhook(url => 'https://hooks.example.com/keypal', secret => 'whsec_s3cr3t_value',
                             events => '{key.revoked,key.created}') > 0, 'keypal_add_webhook returns an id');
SELECT keypal_add_webhook('https://all.example.com/', 'whsec_all_events') AS all_id \gset
SELECT keypal_add_webhook('https://keys.example.com/', 'whsec_key_star', '{key.*}') AS star_id \gset
SELECT is((SELECT events FROM keypal_list_webhooks() WHERE id = :all_id), '{*}'::text[], 'events default to every event');
SELECT is((SELECT events FROM keypal_list_webhooks() WHERE url = 'https://hooks.example.com/keypal'),
          '{key.created,key.revoked}'::text[], 'events are stored sorted, as given');
SELECT is((SELECT count(*) FROM keypal_list_webhooks()), 3::bigint, 'keypal_list_webhooks lists them');
SELECT ok(NOT EXISTS (SELECT 1 FROM pg_proc p, unnest(p.proargnames, p.proargmodes) AS a(n, m)
                       WHERE p.proname LIKE 'keypal\_%webhook%' AND a.m IN ('o', 't') AND a.n = 'secret'),
          'no webhook function returns a secret column');
SELECT ok((SELECT string_agg(to_jsonb(w)::text, '') FROM keypal_list_webhooks() w) !~ 'whsec_',
          'keypal_list_webhooks never shows a secret');
SELECT ok((SELECT coalesce(string_agg(to_jsonb(a)::text, ''), '') FROM keypal.audit_log a) !~ 'whsec_',
          'nor does the audit log');

-- Validation: 22023 naming the argument, nothing written
SELECT is(tap.err($$SELECT keypal_add_webhook('ftp://x.example.com/', 's')$$), '22023', 'a non-http url is refused');
SELECT is(tap.err($$SELECT keypal_add_webhook('https://user:pw@x.example.com/', 's')$$), '22023', 'credentials in the url are refused');
SELECT is(tap.err($$SELECT keypal_add_webhook('https:///nohost', 's')$$), '22023', 'a url without a host is refused');
SELECT is(tap.err($$SELECT keypal_add_webhook('https://x.example.com/a b', 's')$$), '22023', 'spaces are refused');
SELECT is(tap.err($$SELECT keypal_add_webhook('https://x.example.com/', NULL)$$), '22023', 'a secret is required');
SELECT is(tap.err($$SELECT keypal_add_webhook('https://x.example.com/', '')$$), '22023', 'an empty secret is refused');
SELECT is(tap.err($$SELECT keypal_add_webhook('https://x.example.com/', 's', '{key.exploded}')$$), '22023', 'an unknown event is refused');
SELECT is(tap.err($$SELECT keypal_add_webhook('https://x.example.com/', 's', '{}')$$), '22023', 'no events at all is refused');
SELECT is(tap.err($$SELECT keypal_add_webhook('https://x.example.com/', 's', ARRAY[NULL])$$), '22023', 'a NULL event is refused');
SELECT throws_like($$SELECT keypal_add_webhook('https://x.example.com/', 's', '{nope}')$$, '%events%', 'the message names the argument');
SELECT is((SELECT count(*) FROM keypal.webhooks), 3::bigint, 'refused webhooks left nothing behind');

-- Update, enable/disable, remove; unknown ids
SELECT ok(keypal_update_webhook(:star_id, secret => 'whsec_rotated'), 'keypal_update_webhook changes the secret');
SELECT is((SELECT secret FROM keypal.webhooks WHERE id = :star_id), 'whsec_rotated', 'and only it');
SELECT is((SELECT url FROM keypal.webhooks WHERE id = :star_id), 'https://keys.example.com/', 'the url is kept');
SELECT is(tap.err($$SELECT keypal_update_webhook(999999, url => 'https://a.example.com/')$$), 'P0002 WEBHOOK_NOT_FOUND', 'update of an unknown webhook: P0002');
SELECT is(tap.err($$SELECT keypal_update_webhook(1, url => 'gopher://a')$$), '22023', 'update validates the url');
SELECT ok(keypal_disable_webhook(:all_id), 'keypal_disable_webhook');
SELECT ok(NOT keypal_disable_webhook(:all_id), 'twice: no change');
SELECT is(tap.err($$SELECT keypal_enable_webhook(999999)$$), 'P0002 WEBHOOK_NOT_FOUND', 'enable of an unknown webhook: P0002');
SELECT is(tap.err($$SELECT keypal_remove_webhook(999999)$$), 'P0002 WEBHOOK_NOT_FOUND', 'remove of an unknown webhook: P0002');

-- What each event queues: matching, enabled webhooks only, in the event's transaction
CREATE TEMP TABLE k AS SELECT * FROM keypal_create(owner_id => 'hooks');
SELECT is((SELECT array_agg(w.url ORDER BY w.url) FROM keypal.webhook_queue q JOIN keypal.webhooks w ON w.id = q.webhook_id
            JOIN keypal.events e ON e.id = q.event_id WHERE e.event = 'key.created' AND e.key_id = (SELECT id FROM k)),
          ARRAY['https://hooks.example.com/keypal', 'https://keys.example.com/'],
          'key.created is queued for the webhooks that named it or key.*, not for a disabled one');
SELECT keypal_update((SELECT id FROM k), name => 'renamed') IS NOT NULL AS updated;
SELECT is((SELECT array_agg(w.url) FROM keypal.webhook_queue q JOIN keypal.webhooks w ON w.id = q.webhook_id
            JOIN keypal.events e ON e.id = q.event_id WHERE e.event = 'key.updated' AND e.key_id = (SELECT id FROM k)),
          ARRAY['https://keys.example.com/'], 'key.updated only for key.*');
SELECT ok(keypal_enable_webhook(:all_id), 'keypal_enable_webhook');
SELECT keypal_revoke((SELECT id FROM k));
SELECT is((SELECT count(*) FROM keypal.webhook_queue q JOIN keypal.events e ON e.id = q.event_id
            WHERE e.event = 'key.revoked' AND e.key_id = (SELECT id FROM k)), 3::bigint,
          'key.revoked: one delivery per matching webhook, the enabled * one included');
SELECT is((SELECT min(q.attempts) FROM keypal.webhook_queue q), 0, 'queued deliveries have no attempt yet');

-- Redelivery of a dead delivery
UPDATE keypal.webhook_queue SET dead_at = now(), attempts = 8
 WHERE event_id = (SELECT max(id) FROM keypal.events WHERE event = 'key.revoked') AND webhook_id = :all_id;
SELECT is(keypal_redeliver((SELECT max(id) FROM keypal.events WHERE event = 'key.revoked')), 1, 'keypal_redeliver re-queues the dead delivery');
SELECT is((SELECT attempts || ' ' || (dead_at IS NULL) FROM keypal.webhook_queue
            WHERE event_id = (SELECT max(id) FROM keypal.events WHERE event = 'key.revoked') AND webhook_id = :all_id),
          '0 true', 'with a fresh set of attempts');
SELECT is(keypal_redeliver((SELECT max(id) FROM keypal.events WHERE event = 'key.revoked')), 0, 'nothing dead: 0');
SELECT is(tap.err($$SELECT keypal_redeliver(-1)$$), 'P0002 EVENT_NOT_FOUND', 'an unknown event: P0002');
SELECT is(tap.err($$SELECT keypal_redeliver(NULL)$$), '22023', 'a NULL event: 22023');

-- The worker's claim: leased, at most webhook_concurrency per webhook, a key's events in order
SELECT keypal_configure(webhook_concurrency => 2) IS NOT NULL AS configured;
SELECT count(*) FROM generate_series(1, 3), LATERAL keypal_create(owner_id => 'hooks' || generate_series);
CREATE TEMP TABLE claimed AS SELECT * FROM keypal.claim_deliveries('{}', '{}', 100);
SELECT ok((SELECT count(*) FROM claimed WHERE webhook_id IS NOT NULL) > 0, 'the claim hands out due deliveries');
SELECT is((SELECT max(n) FROM (SELECT count(*) n FROM claimed WHERE webhook_id IS NOT NULL GROUP BY webhook_id) x), 2::bigint,
          'at most webhook_concurrency per webhook');
SELECT is((SELECT count(*) FROM claimed c JOIN keypal.webhook_queue q USING (webhook_id, event_id)
            WHERE c.webhook_id IS NOT NULL AND q.leased_until IS NULL), 0::bigint, 'each one leased');
SELECT ok((SELECT bool_and(c.body::jsonb = e.payload AND c.secret = w.secret) FROM claimed c
            JOIN keypal.events e ON e.id = c.event_id JOIN keypal.webhooks w ON w.id = c.webhook_id), 'with its payload and secret');
SELECT is((SELECT count(*) FROM claimed c WHERE c.webhook_id IS NOT NULL AND EXISTS (
            SELECT 1 FROM claimed d WHERE d.webhook_id = c.webhook_id AND d.event_id <> c.event_id
               AND (SELECT key_id FROM keypal.events WHERE id = d.event_id) = (SELECT key_id FROM keypal.events WHERE id = c.event_id))),
          0::bigint, 'never two events of one key to one webhook at once');
SELECT is((SELECT count(*) FROM keypal.claim_deliveries('{}', '{}', 100) c JOIN claimed USING (webhook_id, event_id)), 0::bigint,
          'leased ones are not handed out again');
SELECT keypal.finish_deliveries(array_agg(webhook_id), array_agg(event_id), array_agg(attempt),
                                array_agg(CASE WHEN webhook_id = :star_id THEN 503 ELSE 200 END), array_agg(NULL::text))
  FROM claimed WHERE webhook_id IS NOT NULL;
SELECT is((SELECT count(*) FROM keypal.webhook_deliveries), (SELECT count(*) FROM claimed WHERE webhook_id IS NOT NULL),
          'every attempt is logged');
SELECT ok((SELECT bool_and(q.attempts = 1 AND q.next_at > clock_timestamp() AND q.dead_at IS NULL)
             FROM claimed c JOIN keypal.webhook_queue q USING (webhook_id, event_id) WHERE c.webhook_id = :star_id),
          'a 503 is retried later (backoff), not dead');
SELECT is((SELECT count(*) FROM claimed c JOIN keypal.webhook_queue q USING (webhook_id, event_id) WHERE c.webhook_id <> :star_id),
          0::bigint, 'a 200 ends the delivery');
SELECT keypal_configure(webhook_max_attempts => 1) IS NOT NULL AS configured;
UPDATE keypal.webhook_queue SET next_at = now() - interval '1 hour' WHERE webhook_id = :star_id;
CREATE TEMP TABLE claimed2 AS SELECT * FROM keypal.claim_deliveries('{}', '{}', 100) WHERE webhook_id = :star_id;
SELECT keypal.finish_deliveries(array_agg(webhook_id), array_agg(event_id), array_agg(attempt), array_agg(NULL::integer),
                                array_agg('timeout'::text)) FROM claimed2;
SELECT ok((SELECT bool_and(q.dead_at IS NOT NULL) FROM claimed2 c JOIN keypal.webhook_queue q USING (webhook_id, event_id)),
          'out of attempts: dead');
SELECT is((SELECT count(*) FROM keypal_list_webhooks() WHERE id = :star_id AND dead > 0 AND last_error = 'timeout'), 1::bigint,
          'keypal_list_webhooks shows dead deliveries and the last error');

-- Settings
SELECT is(tap.err($$SELECT keypal_configure(webhook_max_attempts => 0)$$), '22023', 'webhook_max_attempts must be at least 1');
SELECT is(tap.err($$SELECT keypal_configure(webhook_concurrency => 1000)$$), '22023', 'webhook_concurrency is bounded');
SELECT is(tap.err($$SELECT keypal_configure(webhook_timeout => 'soon')$$), '22007', 'webhook_timeout is a duration');
SELECT is(tap.err($$SELECT keypal_configure(webhook_timeout => '1h')$$), '22023', 'webhook_timeout is at most 5 minutes');
SELECT is(keypal_configure(webhook_timeout => '2s')->>'webhook_timeout', '00:00:02', 'webhook_timeout is set');
SELECT is((keypal_configure()->>'webhook_allow_private')::boolean, false, 'private targets are refused by default');

-- Privileges: management rights, never PUBLIC
SET LOCAL ROLE keypal_plain;
SELECT throws_ok($$SELECT keypal_add_webhook('https://evil.example.com/', 's')$$, '42501', NULL, 'a plain role cannot add a webhook');
SELECT throws_ok($$SELECT * FROM keypal_list_webhooks()$$, '42501', NULL, 'nor list them');
SELECT throws_ok($$SELECT keypal_redeliver(1)$$, '42501', NULL, 'nor redeliver');
SELECT throws_ok($$SELECT * FROM keypal.webhooks$$, '42501', NULL, 'nor read keypal.webhooks');
RESET ROLE;
GRANT EXECUTE ON FUNCTION keypal_add_webhook(text, text, text[]), keypal_list_webhooks() TO keypal_admin;
SET LOCAL ROLE keypal_admin;
SELECT ok(keypal_add_webhook('https://granted.example.com/', 'whsec_granted') > 0, 'a granted role can add one');
SELECT ok((SELECT count(*) FROM keypal_list_webhooks()) > 0, 'and list them');
SELECT throws_ok($$SELECT secret FROM keypal.webhooks$$, '42501', NULL, 'but still not read the secrets');
RESET ROLE;

-- Removal takes its queue and log along
SELECT ok(keypal_remove_webhook(:star_id), 'keypal_remove_webhook');
SELECT is((SELECT count(*) FROM keypal.webhook_queue WHERE webhook_id = :star_id)
          + (SELECT count(*) FROM keypal.webhook_deliveries WHERE webhook_id = :star_id), 0::bigint,
          'its deliveries and log went with it');

SELECT * FROM finish();
ROLLBACK;
