-- keypal: the automation half — webhooks (queued with each event, delivered by the flush
-- worker: src/delivery.rs), schedules and maintenance (keypal_run_maintenance, run by
-- pg_cron or by the worker every keypal.maintenance_interval).
--
-- Loaded before api.sql (which the final comments and grants are part of). Its functions are
-- PL/pgSQL: they call api.sql's helpers only when they run.

--------------------------------------------------------------------------------
-- Settings helpers
--------------------------------------------------------------------------------

-- retention with the given entries merged in: each a duration, or JSON null (keep for good).
CREATE FUNCTION keypal.merge_retention(current jsonb, given jsonb, arg text)
RETURNS jsonb LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    e record;
    merged jsonb := coalesce(current, '{}');
BEGIN
    IF given = 'null' THEN
        RETURN '{}';
    END IF;
    IF jsonb_typeof(given) <> 'object' THEN
        RAISE EXCEPTION 'invalid %: a JSON object of table -> duration, e.g. {"events": "30d"}', arg
            USING ERRCODE = '22023';
    END IF;
    FOR e IN SELECT * FROM jsonb_each(given) LOOP
        IF e.key NOT IN ('events', 'webhook_deliveries', 'usage', 'audit_log') THEN
            RAISE EXCEPTION 'invalid %: unknown table % (events, webhook_deliveries, usage, audit_log)',
                arg, quote_literal(e.key) USING ERRCODE = '22023';
        END IF;
        IF e.value = 'null' THEN
            merged := merged - e.key;
        ELSIF jsonb_typeof(e.value) <> 'string' THEN
            RAISE EXCEPTION 'invalid %: % must be a duration string such as "30d", or null', arg, e.key
                USING ERRCODE = '22023';
        ELSE
            PERFORM keypal.parse_duration(e.value #>> '{}', arg || '.' || e.key);
            merged := merged || jsonb_build_object(e.key, e.value);
        END IF;
    END LOOP;
    RETURN merged;
END $$;

--------------------------------------------------------------------------------
-- Webhooks
--------------------------------------------------------------------------------

CREATE FUNCTION keypal.webhook_not_found(id bigint)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF id IS NULL THEN
        RAISE EXCEPTION 'invalid id: is required (a webhook''s id, as keypal_add_webhook returned it)'
            USING ERRCODE = '22023';
    END IF;
    RAISE EXCEPTION 'WEBHOOK_NOT_FOUND: no webhook with id %', coalesce(id::text, 'NULL')
        USING ERRCODE = 'P0002', DETAIL = 'WEBHOOK_NOT_FOUND';
END $$;

-- Checks a webhook's url, secret and events (22023 naming the argument); events as stored.
CREATE FUNCTION keypal.check_webhook(url text, secret text, events text[])
RETURNS text[] LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    known text[] := ARRAY['key.created', 'key.revoked', 'key.rotated', 'key.expired', 'key.expiring',
                          'key.disabled', 'key.enabled', 'key.updated', 'quota.exceeded',
                          'key.*', 'quota.*', '*'];
    bad text;
BEGIN
    IF url IS NOT NULL AND (length(url) > 2048
       OR url !~* '^https?://[^/?#@[:space:]]+(:[0-9]+)?([/?#][^[:space:]]*)?$') THEN
        RAISE EXCEPTION 'invalid url: % (an http:// or https:// URL with a host, no credentials, no spaces)',
            quote_literal(left(url, 200)) USING ERRCODE = '22023';
    END IF;
    IF secret IS NOT NULL AND length(secret) = 0 THEN
        RAISE EXCEPTION 'invalid secret: must not be empty' USING ERRCODE = '22023';
    END IF;
    IF events IS NULL THEN
        RETURN NULL;
    END IF;
    IF cardinality(events) = 0 THEN
        RAISE EXCEPTION 'invalid events: name at least one event, or ''*'' for all' USING ERRCODE = '22023';
    END IF;
    SELECT e INTO bad FROM unnest(events) e WHERE e IS NULL OR NOT e = ANY (known) LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'invalid events: unknown event % (one of %)', coalesce(quote_literal(bad), 'NULL'),
            array_to_string(known, ', ') USING ERRCODE = '22023';
    END IF;
    RETURN ARRAY(SELECT DISTINCT e FROM unnest(events) e ORDER BY e);
END $$;

CREATE FUNCTION keypal_add_webhook(url text DEFAULT NULL, secret text DEFAULT NULL, events text[] DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    new_id bigint;
BEGIN
    IF url IS NULL THEN
        RAISE EXCEPTION 'invalid url: required' USING ERRCODE = '22023';
    END IF;
    IF secret IS NULL THEN
        RAISE EXCEPTION 'invalid secret: required (it signs every delivery)' USING ERRCODE = '22023';
    END IF;
    INSERT INTO keypal.webhooks (url, secret, events)
    VALUES (url, secret, coalesce(keypal.check_webhook(url, secret, events), ARRAY['*']))
    RETURNING id INTO new_id;
    RETURN new_id;
END $$;

CREATE FUNCTION keypal_update_webhook(id bigint DEFAULT NULL, url text DEFAULT NULL, secret text DEFAULT NULL,
                                      events text[] DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    checked text[] := keypal.check_webhook(url, secret, events);
BEGIN
    UPDATE keypal.webhooks w
       SET url = coalesce(keypal_update_webhook.url, w.url),
           secret = coalesce(keypal_update_webhook.secret, w.secret),
           events = coalesce(checked, w.events),
           updated_at = now()
     WHERE w.id = keypal_update_webhook.id;
    IF NOT FOUND THEN
        PERFORM keypal.webhook_not_found(id);
    END IF;
    RETURN true;
END $$;

CREATE FUNCTION keypal.set_webhook_enabled(hook bigint, on_off boolean)
RETURNS boolean LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    was boolean;
BEGIN
    -- NO KEY UPDATE: queueing an event for it (a foreign-key KEY SHARE lock) must not wait.
    SELECT w.enabled INTO was FROM keypal.webhooks w WHERE w.id = hook FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        PERFORM keypal.webhook_not_found(hook);
    END IF;
    IF was = on_off THEN
        RETURN false;
    END IF;
    UPDATE keypal.webhooks SET enabled = on_off, updated_at = now() WHERE id = hook;
    IF on_off THEN
        PERFORM keypal.wake_worker();   -- its pending deliveries resume
    END IF;
    RETURN true;
END $$;

CREATE FUNCTION keypal_enable_webhook(id bigint DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN keypal.set_webhook_enabled(id, true);
END $$;

CREATE FUNCTION keypal_disable_webhook(id bigint DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN keypal.set_webhook_enabled(id, false);
END $$;

CREATE FUNCTION keypal_remove_webhook(id bigint DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    DELETE FROM keypal.webhooks w WHERE w.id = keypal_remove_webhook.id;
    IF NOT FOUND THEN
        PERFORM keypal.webhook_not_found(id);
    END IF;
    RETURN true;
END $$;

CREATE FUNCTION keypal_list_webhooks()
RETURNS TABLE (id bigint, url text, events text[], enabled boolean, created_at timestamptz,
               updated_at timestamptz, pending bigint, dead bigint, last_attempt_at timestamptz,
               last_status_code integer, last_error text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT w.id, w.url, w.events, w.enabled, w.created_at, w.updated_at,
           (SELECT count(*) FROM keypal.webhook_queue q WHERE q.webhook_id = w.id AND q.dead_at IS NULL),
           (SELECT count(*) FROM keypal.webhook_queue q WHERE q.webhook_id = w.id AND q.dead_at IS NOT NULL),
           d.at, d.status_code, d.error
      FROM keypal.webhooks w
      LEFT JOIN LATERAL (SELECT x.at, x.status_code, x.error FROM keypal.webhook_deliveries x
                          WHERE x.webhook_id = w.id ORDER BY x.at DESC LIMIT 1) d ON true
     ORDER BY w.id
$$;

CREATE FUNCTION keypal_redeliver(event_id bigint DEFAULT NULL, webhook_id bigint DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
    n integer;
BEGIN
    IF event_id IS NULL THEN
        RAISE EXCEPTION 'invalid event_id: required' USING ERRCODE = '22023';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM keypal.events e WHERE e.id = keypal_redeliver.event_id) THEN
        RAISE EXCEPTION 'EVENT_NOT_FOUND: no event with id %', keypal_redeliver.event_id
            USING ERRCODE = 'P0002', DETAIL = 'EVENT_NOT_FOUND';
    END IF;
    -- Behind a pending delivery of the same key to the same webhook it waits as long (a
    -- key's events arrive in order).
    UPDATE keypal.webhook_queue q
       SET dead_at = NULL, attempts = 0, leased_until = NULL,
           next_at = keypal.queued_behind(q.webhook_id, q.key_id, q.event_id)
     WHERE q.event_id = keypal_redeliver.event_id AND q.dead_at IS NOT NULL
       AND (keypal_redeliver.webhook_id IS NULL OR q.webhook_id = keypal_redeliver.webhook_id);
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 THEN
        PERFORM keypal.wake_worker();
    END IF;
    RETURN n;
END $$;

-- When a delivery of event ev (of key k) to webhook hook may go, at the earliest: now, or as
-- late as a pending earlier delivery of the same key to that webhook (in flight, or waiting
-- for a retry): a key's events arrive in order. (For a new event, every queued one is earlier.)
CREATE FUNCTION keypal.queued_behind(hook bigint, k uuid, ev bigint)
RETURNS timestamptz LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
    SELECT greatest(clock_timestamp(),
                    (SELECT max(p.next_at) FROM keypal.webhook_queue p
                      WHERE p.webhook_id = hook AND p.key_id = k AND p.event_id < ev
                        AND p.dead_at IS NULL))
$$;

-- The flush worker's claim: up to room due deliveries, at most webhook_concurrency in flight
-- per webhook (busy: what it has in flight now), none behind a pending delivery of the same
-- key; each leased (next_at moved past the request's timeout) so that a worker gone before
-- answering leaves it to be tried again. A last row (webhook_id NULL) gives next_due: when
-- the earliest delivery not claimed falls due, for webhooks with room left.
CREATE FUNCTION keypal.claim_deliveries(busy_ids bigint[], busy_n integer[], room integer)
RETURNS TABLE (webhook_id bigint, event_id bigint, attempt integer, url text, secret text, body text,
               timeout_ms bigint, allow_private boolean, next_due timestamptz)
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
    cfg keypal.settings := keypal.config();
    t0 timestamptz := clock_timestamp();
    lease_end timestamptz := t0 + cfg.webhook_timeout + interval '30 seconds';
    c_hooks bigint[];
    c_events bigint[];
    due timestamptz;
BEGIN
    WITH room_of AS (
        SELECT w.id,
               cfg.webhook_concurrency - coalesce((SELECT sum(b.n) FROM unnest(busy_ids, busy_n) AS b(id, n)
                                                    WHERE b.id = w.id), 0)::integer AS slots
          FROM keypal.webhooks w WHERE w.enabled
    ), picked AS (
        -- Round robin: each webhook's first due delivery, then each one's second, … so
        -- that room left is shared, not taken by the first webhooks met.
        SELECT r.id AS hook, c.event_id AS ev, row_number() OVER (PARTITION BY r.id ORDER BY c.next_at, c.event_id) AS turn
          FROM room_of r CROSS JOIN LATERAL (
              SELECT q.event_id, q.next_at FROM keypal.webhook_queue q
               WHERE q.webhook_id = r.id AND q.dead_at IS NULL AND q.next_at <= t0
                 AND (q.key_id IS NULL OR NOT EXISTS (
                        SELECT 1 FROM keypal.webhook_queue p
                         WHERE p.webhook_id = q.webhook_id AND p.key_id = q.key_id
                           AND p.event_id < q.event_id AND p.dead_at IS NULL))
               ORDER BY q.next_at, q.event_id
               LIMIT least(greatest(r.slots, 0), greatest(room, 0))
               FOR UPDATE OF q SKIP LOCKED) c
         WHERE r.slots > 0
    ), first_turns AS (
        SELECT p.hook, p.ev FROM picked p ORDER BY p.turn, p.ev LIMIT greatest(room, 0)
    ), leased AS (
        UPDATE keypal.webhook_queue q SET next_at = lease_end, leased_until = lease_end
          FROM first_turns p WHERE q.webhook_id = p.hook AND q.event_id = p.ev
        RETURNING q.webhook_id, q.event_id
    )
    SELECT array_agg(l.webhook_id), array_agg(l.event_id) INTO c_hooks, c_events FROM leased l;
    -- Later deliveries of a claimed one's key wait behind it (until it ends: then
    -- finish_deliveries lets them go), so that they are not due meanwhile.
    -- (Every condition on next_at below is written so that no index can take it: the
    -- planner, with statistics of a queue that just grew, must probe by key, never scan
    -- the due order.)
    UPDATE keypal.webhook_queue q SET next_at = lease_end
      FROM unnest(c_hooks, c_events) AS c(hook, ev)
      JOIN keypal.webhook_queue h ON h.webhook_id = c.hook AND h.event_id = c.ev
     WHERE q.webhook_id = c.hook AND q.key_id = h.key_id AND q.event_id > c.ev
       AND q.dead_at IS NULL AND q.leased_until IS NULL AND (q.next_at < lease_end) IS TRUE;

    RETURN QUERY
    SELECT q.webhook_id, q.event_id, q.attempts + 1, w.url, w.secret, e.payload::text,
           (extract(epoch FROM cfg.webhook_timeout) * 1000)::bigint, cfg.webhook_allow_private,
           NULL::timestamptz
      FROM unnest(c_hooks, c_events) AS c(hook, ev)
      JOIN keypal.webhook_queue q ON q.webhook_id = c.hook AND q.event_id = c.ev
      JOIN keypal.webhooks w ON w.id = c.hook
      JOIN keypal.events e ON e.id = c.ev;

    SELECT min(n.next_at) INTO due
      FROM keypal.webhooks w
     CROSS JOIN LATERAL (SELECT q.next_at FROM keypal.webhook_queue q
                          WHERE q.webhook_id = w.id AND q.dead_at IS NULL AND q.leased_until IS NULL
                          ORDER BY q.next_at LIMIT 1) n
     WHERE w.enabled
       AND cfg.webhook_concurrency >
           coalesce((SELECT sum(b.n) FROM unnest(busy_ids, busy_n) AS b(id, n) WHERE b.id = w.id), 0)
           + (SELECT count(*) FROM unnest(c_hooks) AS h(id) WHERE h.id = w.id);
    RETURN QUERY SELECT NULL::bigint, NULL::bigint, NULL::integer, NULL::text, NULL::text, NULL::text,
                        NULL::bigint, NULL::boolean, due;
END $$;

-- The flush worker's record of finished attempts: a row in webhook_deliveries each; a 2xx
-- answer ends the delivery; otherwise a retry after webhook_backoff * 2^(attempt-1) (at most
-- 6 hours) times a jitter of 0.5 to 1.5, or dead after webhook_max_attempts. Deliveries of
-- the same key held back behind one wait for its retry, or go at once once it ended.
CREATE FUNCTION keypal.finish_deliveries(hook_ids bigint[], event_ids bigint[], attempt_nos integer[],
                                         codes integer[], errors text[])
RETURNS void LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    cfg keypal.settings := keypal.config();
    t0 timestamptz := clock_timestamp();
    d record;
BEGIN
    -- All in one subtransaction; only if that fails, each on its own (one that cannot be
    -- recorded now — its row held by a redelivery, a removal, a prune — is left to its
    -- lease, and made again). One subtransaction per answer only then: many at once would
    -- overflow the backend's subtransaction cache, which slows every other session.
    BEGIN
        FOR d IN SELECT * FROM unnest(hook_ids, event_ids, attempt_nos, codes, errors)
                            AS x(hook, ev, att, code, err) LOOP
            PERFORM keypal.finish_delivery(cfg, t0, d.hook, d.ev, d.att, d.code, d.err);
        END LOOP;
    EXCEPTION WHEN OTHERS THEN
        FOR d IN SELECT * FROM unnest(hook_ids, event_ids, attempt_nos, codes, errors)
                            AS x(hook, ev, att, code, err) LOOP
            BEGIN
                PERFORM keypal.finish_delivery(cfg, t0, d.hook, d.ev, d.att, d.code, d.err);
            EXCEPTION WHEN OTHERS THEN
                RAISE WARNING 'keypal worker: delivery % of event % not recorded (%); it will be made again',
                    d.hook, d.ev, SQLERRM;
            END;
        END LOOP;
    END;
END $$;

CREATE FUNCTION keypal.finish_delivery(cfg keypal.settings, t0 timestamptz, hook bigint, ev bigint,
                                       att integer, code integer, err text)
RETURNS void LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    k uuid;
    retry_at timestamptz;
BEGIN
    -- The delivery may be gone meanwhile (its webhook removed, its event pruned).
    SELECT q.key_id INTO k FROM keypal.webhook_queue q
     WHERE q.webhook_id = hook AND q.event_id = ev FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    INSERT INTO keypal.webhook_deliveries (event_id, webhook_id, attempt, status_code, error, at)
    VALUES (ev, hook, att, code, left(err, 500), t0);
    IF code BETWEEN 200 AND 299 OR att >= cfg.webhook_max_attempts THEN
        IF code BETWEEN 200 AND 299 THEN
            DELETE FROM keypal.webhook_queue q WHERE q.webhook_id = hook AND q.event_id = ev;
        ELSE
            UPDATE keypal.webhook_queue q
               SET attempts = att, dead_at = t0, next_at = t0, leased_until = NULL
             WHERE q.webhook_id = hook AND q.event_id = ev;
        END IF;
        -- Its key's later deliveries, held back behind it, may go now.
        UPDATE keypal.webhook_queue q SET next_at = t0
         WHERE q.webhook_id = hook AND q.key_id = k AND q.event_id > ev
           AND q.dead_at IS NULL AND q.leased_until IS NULL AND q.attempts = 0
           AND (q.next_at > t0) IS TRUE;
    ELSE
        -- webhook_backoff * 2^(attempt-1), at most 6 hours, times 0.5 to 1.5.
        retry_at := t0 + make_interval(secs => least(extract(epoch FROM cfg.webhook_backoff)
                                                     * power(2, least(att - 1, 30)), 21600)
                                               * (0.5 + random()));
        UPDATE keypal.webhook_queue q
           SET attempts = att, next_at = retry_at, leased_until = NULL
         WHERE q.webhook_id = hook AND q.event_id = ev;
        UPDATE keypal.webhook_queue q SET next_at = retry_at
         WHERE q.webhook_id = hook AND q.key_id = k AND q.event_id > ev
           AND q.dead_at IS NULL AND q.leased_until IS NULL AND (q.next_at < retry_at) IS TRUE;
    END IF;
END $$;

-- At a worker's start: what an earlier worker had in flight is tried again now.
CREATE FUNCTION keypal.release_leases()
RETURNS void LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
    UPDATE keypal.webhook_queue SET next_at = clock_timestamp(), leased_until = NULL
     WHERE leased_until IS NOT NULL;
$$;

-- Whether this database has deliveries pending (the worker stays while it has).
CREATE FUNCTION keypal.deliveries_pending()
RETURNS boolean LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT EXISTS (SELECT 1 FROM keypal.webhook_queue q JOIN keypal.webhooks w ON w.id = q.webhook_id
                    WHERE q.dead_at IS NULL AND w.enabled);
$$;

--------------------------------------------------------------------------------
-- Schedules: timers kept by trigger, fired by keypal_run_maintenance
--------------------------------------------------------------------------------

-- When a key's timer of this kind falls due (NULL: none).
CREATE FUNCTION keypal.timer_due(k keypal.keys, kind text)
RETURNS timestamptz LANGUAGE sql STABLE AS $$
    SELECT CASE kind
        WHEN 'disable' THEN CASE WHEN k.enabled THEN k.disable_at END
        WHEN 'revoke' THEN k.revoke_at
        WHEN 'expiring' THEN k.expires_at - k.notify_before
        WHEN 'expired' THEN k.expires_at
    END
$$;

-- The moment to arm a key's timer of this kind for (NULL: none). A revoked key has none;
-- keypal_import: an expiry notice whose moment passed before the record came here was the
-- source's to send, so only one still ahead is armed. A disable or revoke that is due is
-- armed, past or not: the record's state says it was not applied (a key disabled or revoked
-- has no such timer), and verify already refuses the key; the worker writes it down here.
CREATE FUNCTION keypal.timer_to_arm(k keypal.keys, kind text, importing boolean)
RETURNS timestamptz LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN k.revoked_at <= now() THEN NULL
                WHEN importing AND kind IN ('expiring', 'expired') AND keypal.timer_due(k, kind) <= now() THEN NULL
                ELSE keypal.timer_due(k, kind) END
$$;

-- The worker applies timers (when it runs maintenance): make sure one runs once some are set.
CREATE FUNCTION keypal.timers_armed(n bigint)
RETURNS void LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF n > 0 AND current_setting('keypal.maintenance_interval', true) IS DISTINCT FROM '0' THEN
        PERFORM keypal.ensure_worker();
    END IF;
END $$;

-- One statement's changed keys' timers, from its transition tables: a timer whose moment
-- changed is set, moved or dropped; a revoked key's are dropped.
CREATE FUNCTION keypal.arm_timers()
RETURNS trigger LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET jit = off SET enable_nestloop = off AS $$
DECLARE
    importing boolean := current_setting('keypal._action', true) = 'imported';
    ids       uuid[];
    kinds     text[];
    dues      timestamptz[];
BEGIN
    IF NOT EXISTS (SELECT 1 FROM keypal_new) THEN
        RETURN NULL;
    END IF;
    SELECT array_agg(n.id), array_agg(w.kind), array_agg(keypal.timer_to_arm(ROW(n.*)::keypal.keys, w.kind, importing))
      INTO ids, kinds, dues
      FROM keypal_new n JOIN keypal_old o USING (id)
     CROSS JOIN unnest(ARRAY['disable', 'revoke', 'expiring', 'expired']) AS w(kind)
     -- (notify_before as text: '1 mon' = '30 days' as intervals, not as moments before most expiries)
     WHERE (o.disable_at, o.revoke_at, o.expires_at, o.notify_before::text, o.enabled, o.revoked_at)
           IS DISTINCT FROM (n.disable_at, n.revoke_at, n.expires_at, n.notify_before::text, n.enabled, n.revoked_at)
       AND (n.revoked_at <= now()
            OR keypal.timer_due(ROW(o.*)::keypal.keys, w.kind)
               IS DISTINCT FROM keypal.timer_due(ROW(n.*)::keypal.keys, w.kind));
    IF ids IS NOT NULL THEN
        PERFORM keypal.timers_armed(keypal.set_timers(ids, kinds, dues));
    END IF;
    RETURN NULL;
END $$;

-- Sets (a due moment) or drops (NULL) these timers, one probe of the primary key per timer
-- (a nested loop, whatever the planner guesses of the arrays); returns how many were set.
-- (PL/pgSQL: planned once per session; a SQL function with SET clauses is planned at every
-- call, a third of revoking one key. A kept plan made while key_timers was small must still
-- probe its primary key: sequential scans and materializing are off, and JIT with them.)
CREATE FUNCTION keypal.set_timers(ids uuid[], kinds text[], dues timestamptz[])
RETURNS bigint LANGUAGE plpgsql VOLATILE SET enable_nestloop = on SET enable_hashjoin = off SET enable_mergejoin = off
    SET enable_seqscan = off SET enable_material = off SET jit = off AS $$
DECLARE
    n bigint;
BEGIN
    WITH wanted AS (
        SELECT * FROM unnest(ids, kinds, dues) AS d(key_id, kind, due)),
    dropped AS (
        DELETE FROM keypal.key_timers t USING wanted d
         WHERE d.due IS NULL AND t.key_id = d.key_id AND t.kind = d.kind),
    set AS (
        INSERT INTO keypal.key_timers AS t (key_id, kind, due_at)
        SELECT d.key_id, d.kind, d.due FROM wanted d WHERE d.due IS NOT NULL
            ON CONFLICT (key_id, kind) DO UPDATE SET due_at = EXCLUDED.due_at
        RETURNING 1)
    SELECT count(*) INTO n FROM set;
    RETURN n;
END $$;
CREATE TRIGGER keys_timers_update AFTER UPDATE ON keypal.keys
    REFERENCING OLD TABLE AS keypal_old NEW TABLE AS keypal_new
    FOR EACH STATEMENT EXECUTE FUNCTION keypal.arm_timers();

-- quota_usage.resets_at: when the row's period ends, by the key's quota period (UTC).
CREATE FUNCTION keypal.quota_resets_at()
RETURNS trigger LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    NEW.resets_at := (NEW.period_start AT TIME ZONE 'UTC'
                      + ('1 ' || coalesce((SELECT k.quota->>'period' FROM keypal.keys k WHERE k.id = NEW.key_id),
                                          'month'))::interval) AT TIME ZONE 'UTC';
    RETURN NEW;
END $$;
CREATE TRIGGER quota_usage_resets_insert BEFORE INSERT ON keypal.quota_usage
    FOR EACH ROW EXECUTE FUNCTION keypal.quota_resets_at();
CREATE TRIGGER quota_usage_resets_update BEFORE UPDATE OF period_start ON keypal.quota_usage
    FOR EACH ROW WHEN (OLD.period_start IS DISTINCT FROM NEW.period_start)
    EXECUTE FUNCTION keypal.quota_resets_at();

--------------------------------------------------------------------------------
-- Maintenance
--------------------------------------------------------------------------------

-- A due timer, on its key (locked): what is due now is done. Returns NULL when the timer
-- is spent, or when it is due now, its key having changed meanwhile.
CREATE FUNCTION keypal.fire_timer(k keypal.keys, which text, t0 timestamptz)
RETURNS timestamptz LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    due timestamptz := keypal.timer_due(k, which);
    data jsonb;
BEGIN
    IF due IS NULL OR k.revoked_at <= t0 THEN
        RETURN NULL;
    END IF;
    IF due > t0 THEN
        RETURN due;
    END IF;
    data := jsonb_strip_nulls(jsonb_build_object('keyId', k.id, 'ownerId', k.owner_id, 'orgId', k.org_id,
                                                 'env', k.env, 'name', k.name, 'expiresAt', k.expires_at));
    IF which = 'revoke' THEN
        PERFORM keypal.begin_change('schedule', NULL, '{"schedule": "revoke_at"}');
        UPDATE keypal.keys SET revoked_at = k.revoke_at, revoke_reason = 'scheduled (revoke_at)',
                               revoked_by = 'schedule'
         WHERE id = k.id;
        PERFORM keypal.end_change();
    ELSIF which = 'disable' THEN
        PERFORM keypal.begin_change('schedule', NULL, '{"schedule": "disable_at"}');
        UPDATE keypal.keys SET enabled = false WHERE id = k.id;
        PERFORM keypal.end_change();
    ELSIF which = 'expiring' THEN
        IF k.expires_at > t0 THEN
            PERFORM keypal.emit_event('key.expiring', k.id, data);
        END IF;
    ELSIF which = 'expired' THEN
        INSERT INTO keypal.audit_log (action, key_id, owner_id, org_id, actor, context)
        VALUES ('expired', k.id, k.owner_id, k.org_id, 'schedule',
                jsonb_build_object('expires_at', k.expires_at));
        PERFORM keypal.emit_event('key.expired', k.id, data);
    END IF;
    RETURN NULL;
END $$;

-- A due timer whose key this transaction holds: fired on the key as it is now (an earlier
-- timer of this batch may have changed it: a parent's revocation cascading to it), if the
-- timer is still there and due; then spent (deleted) or armed again.
CREATE FUNCTION keypal.fire_due(key uuid, which text, t0 timestamptz)
RETURNS void LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    k keypal.keys;
    again timestamptz;
BEGIN
    SELECT * INTO k FROM keypal.keys WHERE id = key;
    IF NOT FOUND OR NOT EXISTS (SELECT 1 FROM keypal.key_timers x
                                 WHERE x.key_id = key AND x.kind = which AND x.due_at <= t0) THEN
        RETURN;
    END IF;
    again := keypal.fire_timer(k, which, t0);
    IF again IS NULL THEN
        DELETE FROM keypal.key_timers x WHERE x.key_id = key AND x.kind = which;
    ELSE
        UPDATE keypal.key_timers x SET due_at = again WHERE x.key_id = key AND x.kind = which;
    END IF;
END $$;

-- One batch of maintenance, at most batch_size rows of work, in the caller's transaction:
-- due timers first, then quota periods that rolled over, then pruning per retention. True
-- when it used its whole budget (more may be left). Rows another transaction holds are
-- skipped (SKIP LOCKED), so two runs at once share the work and never do a row twice.
-- Inside a transaction block (no commit possible between batches) it does everything.
CREATE FUNCTION keypal.maintenance_step(batch_size integer)
RETURNS boolean LANGUAGE plpgsql VOLATILE SECURITY DEFINER
-- A key or row held by another transaction costs at most a second (that timer is tried
-- again later), never a wait as long as that transaction.
SET search_path = pg_catalog, pg_temp SET lock_timeout = '1s' AS $$
DECLARE
    cfg keypal.settings := keypal.config();
BEGIN
    IF batch_size IS NULL OR batch_size NOT BETWEEN 1 AND 100000 THEN
        RAISE EXCEPTION 'invalid batch_size: between 1 and 100000, got %', coalesce(batch_size::text, 'NULL')
            USING ERRCODE = '22023';
    END IF;
    -- SKIP LOCKED sharing of the work needs each statement to see what others committed.
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'keypal maintenance runs at READ COMMITTED, not %', current_setting('transaction_isolation')
            USING ERRCODE = '25001', HINT = 'SET default_transaction_isolation = ''read committed'' for its session.';
    END IF;
    -- A worker must run while deliveries wait (after a restart, nothing else may start
    -- one): maintenance run by pg_cron makes sure of it.
    IF keypal.deliveries_pending() THEN
        PERFORM keypal.wake_worker();
    END IF;
    IF keypal.in_transaction_block() THEN
        WHILE keypal.maintenance_batch(batch_size, clock_timestamp(), cfg) LOOP
        END LOOP;
        RETURN false;
    END IF;
    RETURN keypal.maintenance_batch(batch_size, clock_timestamp(), cfg);
END $$;

CREATE FUNCTION keypal.maintenance_batch(batch_size integer, t0 timestamptz, cfg keypal.settings)
RETURNS boolean LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    budget integer := batch_size;
    t_keys uuid[];
    t_kinds text[];
    n integer;
    age interval;
    p record;
BEGIN
    -- 1. Due timers, earliest first, each with its key locked; a timer whose key another
    -- transaction holds is skipped (SKIP LOCKED on both, the key's first), and comes first
    -- in a later run.
    SELECT array_agg(x.key_id ORDER BY x.due_at), array_agg(x.kind ORDER BY x.due_at)
      INTO t_keys, t_kinds
      FROM (SELECT y.key_id, y.kind, y.due_at
              FROM keypal.key_timers y JOIN keypal.keys kk ON kk.id = y.key_id
             WHERE y.due_at <= t0
               -- A key whose parent is due to be revoked is left to that revocation's cascade:
               -- two runs must not hold a parent and a child each, their cascades waiting on
               -- each other (a deadlock, or a lock_timeout under load).
               AND NOT EXISTS (SELECT 1 FROM keypal.key_timers pt
                                WHERE pt.key_id = kk.parent_id AND pt.kind = 'revoke' AND pt.due_at <= t0)
             ORDER BY y.due_at
             LIMIT budget
               FOR NO KEY UPDATE OF kk SKIP LOCKED
               FOR UPDATE OF y SKIP LOCKED) x;
    n := coalesce(cardinality(t_keys), 0);
    budget := budget - n;
    -- All in one subtransaction; only if one fails (a child key held by another
    -- transaction past lock_timeout, a deadlock with another run), each on its own: the
    -- failing one is tried again in a minute and holds up no other. (One subtransaction
    -- per timer only then: see finish_deliveries.)
    BEGIN
        FOR i IN 1..n LOOP
            PERFORM keypal.fire_due(t_keys[i], t_kinds[i], t0);
        END LOOP;
    EXCEPTION WHEN OTHERS THEN
        FOR i IN 1..n LOOP
            BEGIN
                PERFORM keypal.fire_due(t_keys[i], t_kinds[i], t0);
            EXCEPTION WHEN OTHERS THEN
                RAISE WARNING 'keypal maintenance: % of key % failed (%); tried again in a minute',
                    t_kinds[i], t_keys[i], SQLERRM;
                UPDATE keypal.key_timers x SET due_at = t0 + interval '1 minute'
                 WHERE x.key_id = t_keys[i] AND x.kind = t_kinds[i];
            END;
        END LOOP;
    END;
    IF budget <= 0 THEN
        RETURN true;
    END IF;

    -- 2. Quota periods that rolled over: the count starts again at 0 in the current period
    -- (a row whose key's period changed meanwhile only gets its resets_at right).
    WITH due AS (
        SELECT q.key_id FROM keypal.quota_usage q WHERE q.resets_at <= t0
         ORDER BY q.resets_at LIMIT budget FOR UPDATE SKIP LOCKED
    ), cur AS (
        SELECT d.key_id, date_trunc(coalesce(kk.quota->>'period', 'month'), t0, 'UTC') AS start,
               coalesce(kk.quota->>'period', 'month') AS period
          FROM due d JOIN keypal.keys kk ON kk.id = d.key_id
    )
    UPDATE keypal.quota_usage q
       SET used = CASE WHEN q.period_start < c.start THEN 0 ELSE q.used END,
           period_start = greatest(q.period_start, c.start),
           resets_at = (greatest(q.period_start, c.start) AT TIME ZONE 'UTC'
                        + ('1 ' || c.period)::interval) AT TIME ZONE 'UTC'
      FROM cur c WHERE q.key_id = c.key_id;
    GET DIAGNOSTICS n = ROW_COUNT;
    budget := budget - n;
    IF budget <= 0 THEN
        RETURN true;
    END IF;

    -- 3. Pruning, per retention (the audit log only when a retention names it): the
    -- oldest rows of each table, by its time column.
    FOR p IN SELECT * FROM (VALUES
            ('webhook_deliveries', 'at', ''),
            -- an event a webhook has yet to get (disabled for long, say) stays
            ('events', 'at', 'AND NOT EXISTS (SELECT 1 FROM keypal.webhook_queue q
                                               WHERE q.event_id = x.id AND q.dead_at IS NULL)'),
            ('usage', 'hour', ''),
            ('audit_log', 'at', '')) AS v(tbl, col, keep) LOOP
        age := keypal.parse_duration(cfg.retention->>p.tbl, 'retention.' || p.tbl);
        CONTINUE WHEN age IS NULL;
        EXECUTE format('DELETE FROM keypal.%1$I WHERE ctid = ANY (ARRAY(
                            SELECT x.ctid FROM keypal.%1$I x WHERE x.%2$I < $1 %3$s
                             ORDER BY x.%2$I LIMIT $2 FOR UPDATE SKIP LOCKED))',
                       p.tbl, p.col, p.keep)
            USING t0 - age, budget;
        GET DIAGNOSTICS n = ROW_COUNT;
        budget := budget - n;
        IF budget <= 0 THEN
            RETURN true;
        END IF;
    END LOOP;
    RETURN false;
END $$;

CREATE FUNCTION keypal_maintenance_step(batch_size integer DEFAULT 1000)
RETURNS boolean
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT keypal.maintenance_step(batch_size)
$$;

-- A procedure, to commit between batches: so it can have neither SET search_path nor
-- SECURITY DEFINER. It runs only the schema-qualified step (which has both), and no
-- operator a search_path could redirect.
CREATE PROCEDURE keypal_run_maintenance(batch_size integer DEFAULT 1000)
LANGUAGE plpgsql AS $$
BEGIN
    WHILE @extschema@.keypal_maintenance_step(batch_size) LOOP
        COMMIT;
    END LOOP;
END $$;
