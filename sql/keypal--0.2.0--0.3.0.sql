-- keypal 0.2.0 -> 0.3.0 (ALTER EXTENSION keypal UPDATE).
-- The management plane at scale: the audit, event, timer and cascade triggers on keypal.keys
-- run once per statement over its transition tables (set-based) instead of once per row;
-- events are written per statement with one NOTIFY (keypal.emit_events); keypal_create_many
-- has no 1000-key cap; keypal_disable_all and keypal_enable_all; parse_timestamp no longer
-- opens a subtransaction for NULL.
-- tests/shell/upgrade.t checks that this leaves the schema a fresh 0.3.0 install makes.
\echo Use "ALTER EXTENSION keypal UPDATE TO '0.3.0'" to load this file. \quit

CREATE FUNCTION keypal.emit_events(events text[], key_ids uuid[], data jsonb[])
RETURNS bigint LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    last_id bigint;
    queued  bigint;
BEGIN
    WITH ev AS (
        INSERT INTO keypal.events (event, key_id, payload)
        SELECT e.event, e.key_id, jsonb_build_object(
                   'event', e.event,
                   'timestamp', to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'),
                   'data', e.data)
          FROM unnest(events, key_ids, data) WITH ORDINALITY AS e(event, key_id, data, n)
         ORDER BY e.n
        RETURNING id, event, key_id),
    q AS (
        -- One pending delivery per enabled webhook whose events match; behind a pending
        -- delivery of the same key to the same webhook it waits as long (a key's events
        -- arrive in order; a statement makes at most one event per key).
        INSERT INTO keypal.webhook_queue (webhook_id, event_id, key_id, next_at)
        SELECT w.id, ev.id, ev.key_id, keypal.queued_behind(w.id, ev.key_id, ev.id)
          FROM ev JOIN keypal.webhooks w
            ON w.enabled AND w.events && ARRAY[ev.event, '*', split_part(ev.event, '.', 1) || '.*']
        RETURNING 1)
    SELECT (SELECT max(id) FROM ev), (SELECT count(*) FROM q) INTO last_id, queued;
    IF last_id IS NOT NULL THEN
        PERFORM pg_notify('keypal_events', last_id::text);
    END IF;
    IF queued > 0 THEN
        PERFORM keypal.wake_worker();
    END IF;
    RETURN last_id;
END $$;

CREATE FUNCTION keypal.change_actor()
RETURNS text LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT keypal.actor(current_setting('keypal._actor', true))
$$;

CREATE FUNCTION keypal.change_context()
RETURNS jsonb LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce(nullif(current_setting('keypal._context', true), '')::jsonb, '{}')
$$;

CREATE FUNCTION keypal.event_data(act text, r keypal.keys, who text)
RETURNS jsonb LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT jsonb_strip_nulls(jsonb_build_object(
        'keyId', r.id, 'ownerId', r.owner_id, 'orgId', r.org_id, 'env', r.env, 'name', r.name,
        'revokedBy', CASE WHEN act = 'revoked' THEN r.revoked_by END,
        'reason', CASE WHEN act = 'revoked' THEN r.revoke_reason END,
        'rotatedTo', CASE WHEN act = 'rotated' THEN r.rotated_to END,
        'actor', who))
$$;

CREATE FUNCTION keypal.restoring(relid oid)
RETURNS boolean LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce(current_setting('keypal._actor', true), '') = '' AND keypal.copying_into(relid)
$$;

CREATE FUNCTION keypal.audit_inserted_keys()
RETURNS trigger LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    act text := coalesce(nullif(current_setting('keypal._action', true), ''), 'created');
    who text := keypal.change_actor();
    ids uuid[];
    data jsonb[];
BEGIN
    IF keypal.restoring(TG_RELID) THEN
        RETURN NULL;
    END IF;
    INSERT INTO keypal.audit_log (action, key_id, owner_id, org_id, actor, role, context)
    SELECT act, n.id, n.owner_id, n.org_id, who, session_user, keypal.change_context()
      FROM keypal_new n;
    IF act = 'created' THEN
        SELECT array_agg(n.id), array_agg(keypal.event_data(act, ROW(n.*)::keypal.keys, who)) INTO ids, data
          FROM keypal_new n;
        IF ids IS NOT NULL THEN
            PERFORM keypal.emit_events(array_fill('key.created'::text, ARRAY[cardinality(ids)]), ids, data);
        END IF;
    END IF;
    RETURN NULL;
END $$;

CREATE FUNCTION keypal.audit_deleted_keys()
RETURNS trigger LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO keypal.audit_log (action, key_id, owner_id, org_id, actor, role, context)
    SELECT 'deleted', o.id, o.owner_id, o.org_id, keypal.change_actor(), session_user, keypal.change_context()
      FROM keypal_old o;
    RETURN NULL;
END $$;

CREATE FUNCTION keypal.audit_updated_keys()
RETURNS trigger LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    given text := nullif(current_setting('keypal._action', true), '');
    who   text := keypal.change_actor();
    ctx   jsonb := keypal.change_context();
    acts  text[];
    ids   uuid[];
    data  jsonb[];
BEGIN
    WITH changed AS (
        SELECT row_number() OVER () AS n, a.act, c.r, c.changes
          FROM (SELECT ROW(n.*)::keypal.keys AS r, ROW(o.*)::keypal.keys AS old_r,
                       keypal.row_changes(to_jsonb(o), to_jsonb(n)) AS changes
                  FROM keypal_new n JOIN keypal_old o USING (id)
                 -- A write of last_used_at (the flush worker's) is not a change anyone made.
                 WHERE o.last_used_at IS NOT DISTINCT FROM n.last_used_at) c
          CROSS JOIN LATERAL (SELECT CASE
                -- keypal_import's overwrite (not a cascade it set off, one trigger level down)
                WHEN given = 'imported' AND pg_trigger_depth() = 1 THEN 'imported'
                WHEN (c.r).rotated_to IS NOT NULL AND (c.old_r).rotated_to IS NULL THEN 'rotated'
                WHEN (c.r).revoked_at IS NOT NULL
                     AND ((c.old_r).revoked_at IS NULL OR (c.r).revoked_at < (c.old_r).revoked_at) THEN 'revoked'
                WHEN (c.r).enabled AND NOT (c.old_r).enabled THEN 'enabled'
                WHEN (c.old_r).enabled AND NOT (c.r).enabled THEN 'disabled'
                ELSE 'updated' END AS act) a
         WHERE c.changes <> '{}'),
    audited AS (
        INSERT INTO keypal.audit_log (action, key_id, owner_id, org_id, actor, role, context, changes)
        SELECT x.act, (x.r).id, (x.r).owner_id, (x.r).org_id, who, session_user,
               CASE WHEN x.act = 'revoked' AND (x.r).revoke_reason = 'parent revoked'
                    THEN ctx || jsonb_build_object('cascade_from', (x.r).parent_id) ELSE ctx END,
               x.changes
          FROM changed x ORDER BY x.n)
    SELECT array_agg('key.' || x.act ORDER BY x.n), array_agg((x.r).id ORDER BY x.n),
           array_agg(keypal.event_data(x.act, x.r, who) ORDER BY x.n)
      INTO acts, ids, data
      FROM changed x WHERE x.act <> 'imported';
    IF ids IS NOT NULL THEN
        PERFORM keypal.emit_events(acts, ids, data);
    END IF;
    RETURN NULL;
END $$;

CREATE FUNCTION keypal.timer_to_arm(k keypal.keys, kind text, importing boolean)
RETURNS timestamptz LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN k.revoked_at <= now() THEN NULL
                WHEN importing AND keypal.timer_due(k, kind) <= now() THEN NULL
                ELSE keypal.timer_due(k, kind) END
$$;

CREATE FUNCTION keypal.timers_armed(n bigint)
RETURNS void LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF n > 0 AND current_setting('keypal.maintenance_interval', true) IS DISTINCT FROM '0' THEN
        PERFORM keypal.ensure_worker();
    END IF;
END $$;

CREATE FUNCTION keypal.arm_timers_inserted()
RETURNS trigger LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    importing boolean := current_setting('keypal._action', true) = 'imported';
    armed     bigint;
BEGIN
    IF keypal.restoring(TG_RELID) THEN
        RETURN NULL;
    END IF;
    WITH set AS (
        INSERT INTO keypal.key_timers AS t (key_id, kind, due_at)
        SELECT a.key_id, a.kind, a.due
          FROM (SELECT n.id AS key_id, w.kind, keypal.timer_to_arm(ROW(n.*)::keypal.keys, w.kind, importing) AS due
                  FROM keypal_new n CROSS JOIN unnest(ARRAY['disable', 'revoke', 'expiring', 'expired']) AS w(kind)) a
         WHERE a.due IS NOT NULL
            ON CONFLICT (key_id, kind) DO UPDATE SET due_at = EXCLUDED.due_at
        RETURNING 1)
    SELECT count(*) INTO armed FROM set;
    PERFORM keypal.timers_armed(armed);
    RETURN NULL;
END $$;

CREATE FUNCTION keypal.set_enabled_where(owner text, org text, on_off boolean, actor text)
RETURNS integer LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n integer;
BEGIN
    IF coalesce(owner, '') = '' THEN
        RAISE EXCEPTION 'invalid owner_id: required' USING ERRCODE = '22023';
    END IF;
    PERFORM keypal.begin_change(keypal.actor(actor));
    UPDATE keypal.keys k
       SET enabled = on_off,
           disable_at = CASE WHEN on_off AND k.disable_at <= clock_timestamp() THEN NULL ELSE k.disable_at END
     WHERE k.owner_id = owner AND (org IS NULL OR k.org_id = org)
       AND (k.revoked_at IS NULL OR k.revoked_at > now())
       AND (k.enabled <> on_off OR (on_off AND k.disable_at <= clock_timestamp()));
    GET DIAGNOSTICS n = ROW_COUNT;
    PERFORM keypal.end_change();
    RETURN n;
END $$;

CREATE FUNCTION keypal_disable_all(owner_id text DEFAULT NULL, org_id text DEFAULT NULL, actor text DEFAULT NULL)
RETURNS integer
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT keypal.set_enabled_where(owner_id, org_id, false, actor)
$$;

CREATE FUNCTION keypal_enable_all(owner_id text DEFAULT NULL, org_id text DEFAULT NULL, actor text DEFAULT NULL)
RETURNS integer
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT keypal.set_enabled_where(owner_id, org_id, true, actor)
$$;

CREATE OR REPLACE FUNCTION keypal.parse_timestamp(value text, arg text)
RETURNS timestamptz LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    -- (the exception block below costs a subtransaction: not for the common NULL)
    IF value IS NULL THEN
        RETURN NULL;
    END IF;
    BEGIN
        RETURN value::timestamptz;
    EXCEPTION WHEN others THEN
        RAISE EXCEPTION 'invalid %: % is not a timestamp', arg, quote_literal(value) USING ERRCODE = '22007';
    END;
END $$;

CREATE OR REPLACE FUNCTION keypal.emit_event(event text, key_id uuid, data jsonb)
RETURNS bigint LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
    SELECT keypal.emit_events(ARRAY[event], ARRAY[key_id], ARRAY[data])
$$;

CREATE OR REPLACE FUNCTION keypal.cascade_revocation()
RETURNS trigger LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    parents  uuid[];
    moments  timestamptz[];
    revokers text[];
BEGIN
    SELECT array_agg(p.id), array_agg(p.revoked_at), array_agg(p.revoked_by) INTO parents, moments, revokers
      FROM keypal_new p JOIN keypal_old o USING (id)
     WHERE p.revoked_at IS NOT NULL AND (o.revoked_at IS NULL OR p.revoked_at < o.revoked_at);
    -- (the UPDATE below sets this trigger off again: it ends where no key was newly revoked)
    IF parents IS NULL THEN
        RETURN NULL;
    END IF;
    -- A child already revoked (not merely scheduled to be, as in a rotation's grace) is
    -- left as it is: it was revoked once, and is not again.
    UPDATE keypal.keys c
       SET revoked_at = p.revoked_at, revoke_reason = 'parent revoked', revoked_by = p.revoked_by
      FROM unnest(parents, moments, revokers) AS p(id, revoked_at, revoked_by)
     WHERE c.parent_id = p.id
       AND (c.revoked_at IS NULL OR (c.revoked_at > p.revoked_at AND c.revoked_at > clock_timestamp()));
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION keypal.arm_timers()
RETURNS trigger LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    importing boolean := current_setting('keypal._action', true) = 'imported';
    armed     bigint;
BEGIN
    WITH wanted AS (
        SELECT n.id AS key_id, w.kind, keypal.timer_to_arm(ROW(n.*)::keypal.keys, w.kind, importing) AS due
          FROM keypal_new n JOIN keypal_old o USING (id)
         CROSS JOIN unnest(ARRAY['disable', 'revoke', 'expiring', 'expired']) AS w(kind)
         WHERE (o.disable_at, o.revoke_at, o.expires_at, o.notify_before, o.enabled, o.revoked_at)
               IS DISTINCT FROM (n.disable_at, n.revoke_at, n.expires_at, n.notify_before, n.enabled, n.revoked_at)
           AND (n.revoked_at <= now()
                OR keypal.timer_due(ROW(o.*)::keypal.keys, w.kind)
                   IS DISTINCT FROM keypal.timer_due(ROW(n.*)::keypal.keys, w.kind))),
    dropped AS (
        DELETE FROM keypal.key_timers t USING wanted d
         WHERE d.due IS NULL AND t.key_id = d.key_id AND t.kind = d.kind),
    set AS (
        INSERT INTO keypal.key_timers AS t (key_id, kind, due_at)
        SELECT d.key_id, d.kind, d.due FROM wanted d WHERE d.due IS NOT NULL
            ON CONFLICT (key_id, kind) DO UPDATE SET due_at = EXCLUDED.due_at
        RETURNING 1)
    SELECT count(*) INTO armed FROM set;
    PERFORM keypal.timers_armed(armed);
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION keypal_create_many(specs jsonb DEFAULT NULL)
RETURNS SETOF keypal.created_key
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF jsonb_typeof(specs) IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION 'invalid specs: must be a JSON array of key option objects' USING ERRCODE = '22023';
    END IF;
    FOR i IN 0 .. jsonb_array_length(specs) - 1 LOOP
        RETURN QUERY SELECT * FROM keypal.create_key(specs -> i, format('specs[%s].', i));
    END LOOP;
END $$;

DROP TRIGGER keys_audit ON keypal.keys;
DROP TRIGGER keys_audit_update ON keypal.keys;
DROP TRIGGER keys_cascade_revocation ON keypal.keys;
DROP TRIGGER keys_timers_insert ON keypal.keys;
DROP TRIGGER keys_timers_update ON keypal.keys;
DROP FUNCTION keypal.audit_key_change();
DROP FUNCTION keypal.enqueue_deliveries(bigint, text, uuid);

CREATE TRIGGER keys_audit AFTER INSERT ON keypal.keys REFERENCING NEW TABLE AS keypal_new
    FOR EACH STATEMENT EXECUTE FUNCTION keypal.audit_inserted_keys();

CREATE TRIGGER keys_audit_delete AFTER DELETE ON keypal.keys REFERENCING OLD TABLE AS keypal_old
    FOR EACH STATEMENT EXECUTE FUNCTION keypal.audit_deleted_keys();

CREATE TRIGGER keys_audit_update AFTER UPDATE ON keypal.keys
    REFERENCING OLD TABLE AS keypal_old NEW TABLE AS keypal_new
    FOR EACH STATEMENT EXECUTE FUNCTION keypal.audit_updated_keys();

CREATE TRIGGER keys_cascade_revocation AFTER UPDATE ON keypal.keys
    REFERENCING OLD TABLE AS keypal_old NEW TABLE AS keypal_new
    FOR EACH STATEMENT EXECUTE FUNCTION keypal.cascade_revocation();

CREATE TRIGGER keys_timers_insert AFTER INSERT ON keypal.keys REFERENCING NEW TABLE AS keypal_new
    FOR EACH STATEMENT EXECUTE FUNCTION keypal.arm_timers_inserted();

CREATE TRIGGER keys_timers_update AFTER UPDATE ON keypal.keys
    REFERENCING OLD TABLE AS keypal_old NEW TABLE AS keypal_new
    FOR EACH STATEMENT EXECUTE FUNCTION keypal.arm_timers();

COMMENT ON FUNCTION keypal_disable_all(text, text, text) IS 'Disables every key of an owner (and org_id, if given) that is not revoked, in one statement; returns how many were newly disabled.';

COMMENT ON FUNCTION keypal_enable_all(text, text, text) IS 'Enables every disabled key of an owner (and org_id, if given) that is not revoked, in one statement, clearing a passed disable_at; returns how many were newly enabled.';

REVOKE ALL ON FUNCTION keypal.emit_events(text[], uuid[], jsonb[]) FROM PUBLIC;

REVOKE ALL ON FUNCTION keypal.change_actor() FROM PUBLIC;

REVOKE ALL ON FUNCTION keypal.change_context() FROM PUBLIC;

REVOKE ALL ON FUNCTION keypal.event_data(text, keypal.keys, text) FROM PUBLIC;

REVOKE ALL ON FUNCTION keypal.restoring(oid) FROM PUBLIC;

REVOKE ALL ON FUNCTION keypal.audit_inserted_keys() FROM PUBLIC;

REVOKE ALL ON FUNCTION keypal.audit_deleted_keys() FROM PUBLIC;

REVOKE ALL ON FUNCTION keypal.audit_updated_keys() FROM PUBLIC;

REVOKE ALL ON FUNCTION keypal.timer_to_arm(keypal.keys, text, boolean) FROM PUBLIC;

REVOKE ALL ON FUNCTION keypal.timers_armed(bigint) FROM PUBLIC;

REVOKE ALL ON FUNCTION keypal.arm_timers_inserted() FROM PUBLIC;

REVOKE ALL ON FUNCTION keypal.set_enabled_where(text, text, boolean, text) FROM PUBLIC;

REVOKE ALL ON FUNCTION keypal_disable_all(text, text, text) FROM PUBLIC;

REVOKE ALL ON FUNCTION keypal_enable_all(text, text, text) FROM PUBLIC;
