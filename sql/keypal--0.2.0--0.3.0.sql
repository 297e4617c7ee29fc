-- keypal 0.2.0 -> 0.3.0 (ALTER EXTENSION keypal UPDATE).
-- The management plane at scale: the audit, event, timer and cascade triggers on keypal.keys
-- run once per statement over its transition tables (set-based) instead of once per row;
-- events are written per statement with one NOTIFY (keypal.emit_events); keypal_create_many
-- has no 1000-key cap; keypal_disable_all and keypal_enable_all; parse_timestamp no longer
-- opens a subtransaction for NULL. Keys are made set-based (keypal.create_keys: one INSERT
-- per call of keypal_create_many); the audit diff compares columns, not whole rows as JSON;
-- internal helpers no longer set search_path themselves (their callers pin it).
-- tests/shell/upgrade.t checks that this leaves the schema a fresh 0.3.0 install makes.
\echo Use "ALTER EXTENSION keypal UPDATE TO '0.3.0'" to load this file. \quit

DROP FUNCTION keypal.check_env(text, text, jsonb);

CREATE FUNCTION keypal.check_env(env text, arg text, envs jsonb)
RETURNS boolean LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF env IS NOT NULL AND jsonb_typeof(envs) = 'object' AND NOT envs ? env THEN
        RAISE EXCEPTION 'invalid %: no environment named % (configured: %)', arg, quote_literal(env),
            (SELECT string_agg(e, ', ') FROM jsonb_object_keys(envs) e) USING ERRCODE = '22023';
    END IF;
    RETURN true;
END $$;

CREATE FUNCTION keypal.key_changes(o keypal.keys, n keypal.keys)
RETURNS jsonb LANGUAGE sql IMMUTABLE AS $$
    SELECT coalesce(jsonb_object_agg(c.col, c.change) FILTER (WHERE c.change IS NOT NULL), '{}')
      FROM (VALUES
        ('id', CASE WHEN o.id IS DISTINCT FROM n.id THEN jsonb_build_object('old', o.id, 'new', n.id) END),
        ('algorithm', CASE WHEN o.algorithm IS DISTINCT FROM n.algorithm THEN jsonb_build_object('old', o.algorithm, 'new', n.algorithm) END),
        ('owner_id', CASE WHEN o.owner_id IS DISTINCT FROM n.owner_id THEN jsonb_build_object('old', o.owner_id, 'new', n.owner_id) END),
        ('org_id', CASE WHEN o.org_id IS DISTINCT FROM n.org_id THEN jsonb_build_object('old', o.org_id, 'new', n.org_id) END),
        ('env', CASE WHEN o.env IS DISTINCT FROM n.env THEN jsonb_build_object('old', o.env, 'new', n.env) END),
        ('name', CASE WHEN o.name IS DISTINCT FROM n.name THEN jsonb_build_object('old', o.name, 'new', n.name) END),
        ('description', CASE WHEN o.description IS DISTINCT FROM n.description THEN jsonb_build_object('old', o.description, 'new', n.description) END),
        ('scopes', CASE WHEN o.scopes IS DISTINCT FROM n.scopes THEN jsonb_build_object('old', o.scopes, 'new', n.scopes) END),
        ('resources', CASE WHEN o.resources IS DISTINCT FROM n.resources THEN jsonb_build_object('old', o.resources, 'new', n.resources) END),
        ('tags', CASE WHEN o.tags IS DISTINCT FROM n.tags THEN jsonb_build_object('old', o.tags, 'new', n.tags) END),
        ('metadata', CASE WHEN o.metadata IS DISTINCT FROM n.metadata THEN jsonb_build_object('old', o.metadata, 'new', n.metadata) END),
        ('enabled', CASE WHEN o.enabled IS DISTINCT FROM n.enabled THEN jsonb_build_object('old', o.enabled, 'new', n.enabled) END),
        ('created_at', CASE WHEN o.created_at IS DISTINCT FROM n.created_at THEN jsonb_build_object('old', o.created_at, 'new', n.created_at) END),
        ('expires_at', CASE WHEN o.expires_at IS DISTINCT FROM n.expires_at THEN jsonb_build_object('old', o.expires_at, 'new', n.expires_at) END),
        ('revoked_at', CASE WHEN o.revoked_at IS DISTINCT FROM n.revoked_at THEN jsonb_build_object('old', o.revoked_at, 'new', n.revoked_at) END),
        ('revoke_reason', CASE WHEN o.revoke_reason IS DISTINCT FROM n.revoke_reason THEN jsonb_build_object('old', o.revoke_reason, 'new', n.revoke_reason) END),
        ('revoked_by', CASE WHEN o.revoked_by IS DISTINCT FROM n.revoked_by THEN jsonb_build_object('old', o.revoked_by, 'new', n.revoked_by) END),
        ('rotated_from', CASE WHEN o.rotated_from IS DISTINCT FROM n.rotated_from THEN jsonb_build_object('old', o.rotated_from, 'new', n.rotated_from) END),
        ('rotated_to', CASE WHEN o.rotated_to IS DISTINCT FROM n.rotated_to THEN jsonb_build_object('old', o.rotated_to, 'new', n.rotated_to) END),
        ('parent_id', CASE WHEN o.parent_id IS DISTINCT FROM n.parent_id THEN jsonb_build_object('old', o.parent_id, 'new', n.parent_id) END),
        ('policy', CASE WHEN o.policy IS DISTINCT FROM n.policy THEN jsonb_build_object('old', o.policy, 'new', n.policy) END),
        ('rate_limit', CASE WHEN o.rate_limit IS DISTINCT FROM n.rate_limit THEN jsonb_build_object('old', o.rate_limit, 'new', n.rate_limit) END),
        ('quota', CASE WHEN o.quota IS DISTINCT FROM n.quota THEN jsonb_build_object('old', o.quota, 'new', n.quota) END),
        ('allowed_ips', CASE WHEN o.allowed_ips IS DISTINCT FROM n.allowed_ips THEN jsonb_build_object('old', o.allowed_ips, 'new', n.allowed_ips) END),
        ('blocked_ips', CASE WHEN o.blocked_ips IS DISTINCT FROM n.blocked_ips THEN jsonb_build_object('old', o.blocked_ips, 'new', n.blocked_ips) END),
        ('allowed_regions', CASE WHEN o.allowed_regions IS DISTINCT FROM n.allowed_regions THEN jsonb_build_object('old', o.allowed_regions, 'new', n.allowed_regions) END),
        ('blocked_regions', CASE WHEN o.blocked_regions IS DISTINCT FROM n.blocked_regions THEN jsonb_build_object('old', o.blocked_regions, 'new', n.blocked_regions) END),
        ('disable_at', CASE WHEN o.disable_at IS DISTINCT FROM n.disable_at THEN jsonb_build_object('old', o.disable_at, 'new', n.disable_at) END),
        ('revoke_at', CASE WHEN o.revoke_at IS DISTINCT FROM n.revoke_at THEN jsonb_build_object('old', o.revoke_at, 'new', n.revoke_at) END),
        ('notify_before', CASE WHEN o.notify_before IS DISTINCT FROM n.notify_before THEN jsonb_build_object('old', o.notify_before, 'new', n.notify_before) END),
        ('signing', CASE WHEN o.signing IS DISTINCT FROM n.signing THEN jsonb_build_object('old', o.signing, 'new', n.signing) END)) AS c(col, change)
$$;

CREATE FUNCTION keypal.key_expiry(o jsonb, arg_prefix text, v_exp timestamptz, v_scopes text[],
                                  v_res jsonb, v_ips text[])
RETURNS timestamptz LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF v_exp <= now() THEN
        RAISE EXCEPTION 'invalid %expires_at: % is not in the future', arg_prefix, v_exp USING ERRCODE = '22023';
    END IF;
    IF v_exp IS NULL AND o ? 'policy' THEN
        -- A policy's max_ttl is the default lifetime (capped by a parent's expiry).
        v_exp := now() + (SELECT p.max_ttl FROM keypal.policies p WHERE p.name = o->>'policy');
        IF o ? 'parent_id' THEN
            v_exp := least(v_exp, (SELECT k.expires_at FROM keypal.keys k
                                    WHERE k.id = (o->>'parent_id')::uuid));
        END IF;
    END IF;
    IF o ? 'parent_id' THEN
        v_exp := keypal.check_parent((o->>'parent_id')::uuid, v_scopes, v_res, v_exp, arg_prefix);
        IF keypal.depth_of((o->>'parent_id')::uuid) >= keypal.max_hierarchy_depth() THEN
            RAISE EXCEPTION 'invalid %parent_id: a key hierarchy is at most % levels deep', arg_prefix,
                keypal.max_hierarchy_depth() USING ERRCODE = '22023';
        END IF;
    END IF;
    IF o ? 'policy' THEN
        PERFORM keypal.enforce_policy(o->>'policy', v_scopes, v_res, v_exp, v_ips, arg_prefix);
    END IF;
    RETURN v_exp;
END $$;

CREATE FUNCTION keypal.create_keys(specs jsonb[], prefixes text[], extra jsonb DEFAULT '{}')
RETURNS SETOF keypal.created_key LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    cfg    keypal.settings := keypal.config();
    norm   jsonb[];
    grp    text;
    made   keypal.created_key[] := '{}';
    places bigint[] := '{}';
    m      keypal.created_key[];
    ix     bigint[];
BEGIN
    norm := ARRAY(SELECT keypal.normalize_options(u.s, coalesce(u.p, ''), true)
                    FROM unnest(specs, prefixes) WITH ORDINALITY AS u(s, p, i) ORDER BY u.i);
    -- The audit trigger reads the actor per statement: one INSERT per actor named.
    FOR grp IN SELECT DISTINCT coalesce(o->>'actor', '') FROM unnest(norm) AS o LOOP
        PERFORM keypal.begin_change(keypal.actor(nullif(grp, '')), extra->>'action', extra->'context');
        WITH given AS MATERIALIZED (
            SELECT u.i, u.o, coalesce(u.arg, '') AS arg, gen_random_uuid() AS id,
                   coalesce(u.o->>'env', cfg.default_env) AS env,
                   jsonb_populate_record(NULL::keypal.keys, u.o - 'expires_at' - 'disable_at' - 'revoke_at'
                                                         - 'notify_before' - 'enabled') AS c,
                   CASE WHEN u.o ? 'expires_in'
                        THEN now() + keypal.parse_duration(u.o->>'expires_in', coalesce(u.arg, '') || 'expires_in')
                        ELSE keypal.parse_timestamp(u.o->>'expires_at', coalesce(u.arg, '') || 'expires_at') END AS exp0
              -- (never norm[i] or prefixes[i]: subscripting a big array of variable-width
              -- elements walks it from the start, quadratic over a bulk call)
              FROM unnest(norm, prefixes) WITH ORDINALITY AS u(o, arg, i)
             WHERE coalesce(u.o->>'actor', '') = grp),
        checked AS MATERIALIZED (
            SELECT g.*, coalesce((c).scopes, '{}') AS scopes, coalesce((c).resources, '{}') AS res,
                   coalesce((c).allowed_ips, '{}') AS ips,
                   keypal.check_env(g.env, g.arg || 'env', cfg.environments) AS env_ok,
                   CASE WHEN g.o ? 'policy' OR g.o ? 'parent_id' OR g.exp0 <= now()
                        THEN keypal.key_expiry(g.o, g.arg, g.exp0, coalesce((c).scopes, '{}'),
                                               coalesce((c).resources, '{}'), coalesce((c).allowed_ips, '{}'))
                        ELSE g.exp0 END AS exp,
                   -- A signing key's secret (derived, never stored; 55000 without keypal.signing_secret).
                   CASE WHEN coalesce((g.o->>'signing')::boolean, false) THEN keypal.signing_secret_for(g.id) END AS secret,
                   keypal.generate_key(coalesce(cfg.environments -> g.env ->> 'prefix', cfg.prefix),
                                       cfg.length, cfg.alphabet) AS body
              FROM given g),
        keyed AS MATERIALIZED (
            SELECT k.*, CASE WHEN cfg.checksum THEN k.body || keypal.key_checksum(k.body, cfg.alphabet)
                             ELSE k.body END AS key
              FROM checked k),
        inserted AS (
            INSERT INTO keypal.keys (id, key_hash, algorithm, owner_id, org_id, env, name, description, scopes,
                                     resources, tags, metadata, enabled, expires_at, parent_id, policy,
                                     rate_limit, quota, allowed_ips, blocked_ips, allowed_regions,
                                     blocked_regions, disable_at, revoke_at, notify_before, rotated_from, signing)
            SELECT k.id, keypal.hash_key(k.key, cfg.algorithm), cfg.algorithm, (k.c).owner_id, (k.c).org_id,
                   k.env, (k.c).name, (k.c).description, k.scopes, k.res, coalesce((k.c).tags, '{}'),
                   coalesce(k.o->'metadata', '{}'), coalesce((k.o->>'enabled')::boolean, true), k.exp,
                   (k.c).parent_id, (k.c).policy, k.o->'rate_limit', nullif(k.o->'quota', 'null'), k.ips,
                   coalesce((k.c).blocked_ips, '{}'), coalesce((k.c).allowed_regions, '{}'),
                   coalesce((k.c).blocked_regions, '{}'),
                   keypal.parse_timestamp(k.o->>'disable_at', k.arg || 'disable_at'),
                   keypal.parse_timestamp(k.o->>'revoke_at', k.arg || 'revoke_at'),
                   keypal.parse_duration(k.o->>'notify_before', k.arg || 'notify_before'),
                   (extra->>'rotated_from')::uuid, k.secret IS NOT NULL
              FROM keyed k WHERE k.env_ok ORDER BY k.i)
        SELECT array_agg(ROW(k.key, k.id, k.exp, k.env, k.secret)::keypal.created_key ORDER BY k.i),
               array_agg(k.i ORDER BY k.i)
          INTO m, ix FROM keyed k;
        made := made || m;
        places := places || ix;
    END LOOP;
    PERFORM keypal.end_change();
    RETURN QUERY SELECT x.key, x.id, x.expires_at, x.env, x.signing_secret
                   FROM unnest(made, places) AS x(key, id, expires_at, env, signing_secret, i) ORDER BY x.i;
END $$;

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
RETURNS text LANGUAGE sql STABLE AS $$
    SELECT keypal.actor(current_setting('keypal._actor', true))
$$;

CREATE FUNCTION keypal.change_context()
RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT coalesce(nullif(current_setting('keypal._context', true), '')::jsonb, '{}')
$$;

CREATE FUNCTION keypal.event_data(act text, r keypal.keys, who text)
RETURNS jsonb LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_strip_nulls(jsonb_build_object(
        'keyId', r.id, 'ownerId', r.owner_id, 'orgId', r.org_id, 'env', r.env, 'name', r.name,
        'revokedBy', CASE WHEN act = 'revoked' THEN r.revoked_by END,
        'reason', CASE WHEN act = 'revoked' THEN r.revoke_reason END,
        'rotatedTo', CASE WHEN act = 'rotated' THEN r.rotated_to END,
        'actor', who))
$$;

CREATE FUNCTION keypal.restoring(relid oid)
RETURNS boolean LANGUAGE sql VOLATILE AS $$
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
          FROM (SELECT x.r, x.old_r, keypal.key_changes(x.old_r, x.r) AS changes
                  FROM (SELECT ROW(n.*)::keypal.keys AS r, ROW(o.*)::keypal.keys AS old_r, o.last_used_at AS o_used,
                               n.last_used_at AS n_used
                          FROM keypal_new n JOIN keypal_old o USING (id)) x
                 -- A write of last_used_at (the flush worker's) is not a change anyone made.
                 WHERE x.o_used IS NOT DISTINCT FROM x.n_used) c
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
RETURNS timestamptz LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN k.revoked_at <= now() THEN NULL
                WHEN importing AND keypal.timer_due(k, kind) <= now() THEN NULL
                ELSE keypal.timer_due(k, kind) END
$$;

CREATE FUNCTION keypal.timers_armed(n bigint)
RETURNS void LANGUAGE plpgsql VOLATILE AS $$
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
RETURNS timestamptz LANGUAGE plpgsql STABLE AS $$
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

CREATE OR REPLACE FUNCTION keypal.parse_duration(value text, arg text, allow_zero boolean DEFAULT false)
RETURNS interval LANGUAGE plpgsql STABLE AS $$
DECLARE
    v interval;
BEGIN
    IF value IS NULL THEN
        RETURN NULL;
    END IF;
    v := keypal.parse_short_duration(value, arg);
    -- A bare number would be read as seconds: say which unit instead (zero needs none).
    IF v IS NULL AND value ~ '^\s*[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)\s*$'
       AND value !~ '^\s*[+-]?0*(\.0*)?\s*$' THEN
        RAISE EXCEPTION 'invalid duration for %: % has no unit', arg, quote_literal(value)
            USING ERRCODE = '22007', HINT = 'add a unit: 30s, 5m, 1h, 7d, 2w or 1y';
    END IF;
    IF v IS NULL THEN
        BEGIN
            v := value::interval;
        EXCEPTION WHEN others THEN
            RAISE EXCEPTION 'invalid duration for %: % (use e.g. 30s, 5m, 1h, 7d, 2w, 1y or an interval)',
                arg, quote_literal(value) USING ERRCODE = '22007';
        END;
    END IF;
    IF v < interval '0' OR (v = interval '0' AND NOT allow_zero) THEN
        RAISE EXCEPTION 'invalid duration for %: % must be positive', arg, quote_literal(value)
            USING ERRCODE = '22007';
    END IF;
    RETURN v;
END $$;

CREATE OR REPLACE FUNCTION keypal.text_array(j jsonb)
RETURNS text[] LANGUAGE sql IMMUTABLE AS $$
    SELECT coalesce(array_agg(x ORDER BY n), '{}')
      FROM jsonb_array_elements_text(CASE WHEN jsonb_typeof(j) = 'array' THEN j ELSE '[]' END)
           WITH ORDINALITY AS t(x, n)
$$;

CREATE OR REPLACE FUNCTION keypal.options(names text[], vals jsonb[])
RETURNS jsonb LANGUAGE sql IMMUTABLE AS $$
    SELECT coalesce(jsonb_object_agg(n, v), '{}')
      FROM unnest(names, vals) AS t(n, v)
     WHERE v IS NOT NULL
$$;

CREATE OR REPLACE FUNCTION keypal.actor(given text)
RETURNS text LANGUAGE sql STABLE AS $$
    SELECT coalesce(nullif(given, ''), nullif(current_setting('keypal.actor', true), ''),
                    keypal.invoking_user())
$$;

CREATE OR REPLACE FUNCTION keypal.begin_change(actor text, action text DEFAULT NULL, context jsonb DEFAULT NULL)
RETURNS void LANGUAGE sql VOLATILE AS $$
    SELECT set_config('keypal._actor', coalesce(actor, ''), true),
           set_config('keypal._action', coalesce(action, ''), true),
           set_config('keypal._context', coalesce(context::text, ''), true);
$$;

CREATE OR REPLACE FUNCTION keypal.end_change()
RETURNS void LANGUAGE sql VOLATILE AS $$
    SELECT keypal.begin_change(NULL);
$$;

CREATE OR REPLACE FUNCTION keypal.depth_of(key_id uuid)
RETURNS integer LANGUAGE sql STABLE AS $$
    WITH RECURSIVE up(id, depth) AS (
        SELECT k.parent_id, 1 FROM keypal.keys k WHERE k.id = depth_of.key_id
        UNION ALL
        SELECT k.parent_id, up.depth + 1 FROM keypal.keys k JOIN up ON k.id = up.id
         WHERE up.depth <= keypal.max_hierarchy_depth())
    SELECT max(depth) FROM up
$$;

CREATE OR REPLACE FUNCTION keypal.config() RETURNS keypal.settings
LANGUAGE sql STABLE AS $$
    SELECT s FROM keypal.settings s
    UNION ALL
    SELECT ROW(true, '', 32, 'A-Za-z0-9', 'sha256', '60 seconds'::interval, NULL::jsonb, NULL::jsonb,
               NULL::text, '5 seconds'::interval, 8, '10 seconds'::interval, 4, false,
               '{"events": "30d", "webhook_deliveries": "30d", "usage": "400d"}'::jsonb, now(), false, '[]'::jsonb)::keypal.settings
    LIMIT 1
$$;

CREATE OR REPLACE FUNCTION keypal.timer_due(k keypal.keys, kind text)
RETURNS timestamptz LANGUAGE sql STABLE AS $$
    SELECT CASE kind
        WHEN 'disable' THEN CASE WHEN k.enabled THEN k.disable_at END
        WHEN 'revoke' THEN k.revoke_at
        WHEN 'expiring' THEN k.expires_at - k.notify_before
        WHEN 'expired' THEN k.expires_at
    END
$$;

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

CREATE OR REPLACE FUNCTION keypal.create_key(opts jsonb, arg_prefix text DEFAULT '', extra jsonb DEFAULT '{}')
RETURNS keypal.created_key LANGUAGE sql VOLATILE AS $$
    SELECT * FROM keypal.create_keys(ARRAY[opts], ARRAY[arg_prefix], extra)
$$;

CREATE OR REPLACE FUNCTION keypal_create_many(specs jsonb DEFAULT NULL)
RETURNS SETOF keypal.created_key
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF jsonb_typeof(specs) IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION 'invalid specs: must be a JSON array of key option objects' USING ERRCODE = '22023';
    END IF;
    RETURN QUERY SELECT * FROM keypal.create_keys(
        ARRAY(SELECT e FROM jsonb_array_elements(specs) WITH ORDINALITY AS t(e, i) ORDER BY i),
        ARRAY(SELECT format('specs[%s].', i - 1) FROM generate_series(1, jsonb_array_length(specs)) i));
END $$;

DROP TRIGGER keys_audit ON keypal.keys;
DROP TRIGGER keys_audit_update ON keypal.keys;
DROP TRIGGER keys_cascade_revocation ON keypal.keys;
DROP TRIGGER keys_timers_insert ON keypal.keys;
DROP TRIGGER keys_timers_update ON keypal.keys;
DROP FUNCTION keypal.audit_key_change();
DROP FUNCTION keypal.enqueue_deliveries(bigint, text, uuid);
DROP FUNCTION keypal.row_changes(jsonb, jsonb);

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

REVOKE ALL ON FUNCTION keypal.check_env(text, text, jsonb) FROM PUBLIC;

REVOKE ALL ON FUNCTION keypal.key_changes(keypal.keys, keypal.keys) FROM PUBLIC;

REVOKE ALL ON FUNCTION keypal.key_expiry(jsonb, text, timestamptz, text[], jsonb, text[]) FROM PUBLIC;

REVOKE ALL ON FUNCTION keypal.create_keys(jsonb[], text[], jsonb) FROM PUBLIC;

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
