-- keypal 0.2.0 -> 0.3.0 (ALTER EXTENSION keypal UPDATE).
-- The management plane at scale: the audit, event, timer and cascade triggers on keypal.keys
-- run once per statement over its transition tables (set-based) instead of once per row;
-- events are written per statement with one NOTIFY (keypal.emit_events); keypal_create_many
-- has no 1000-key cap; keypal_disable_all and keypal_enable_all; parse_timestamp no longer
-- opens a subtransaction for NULL. Keys are made set-based (keypal.create_keys: one INSERT
-- per call of keypal_create_many); the audit diff compares columns, not whole rows as JSON;
-- internal helpers no longer set search_path themselves (their callers pin it).
-- It replaces the triggers on keypal.keys, which takes an ACCESS EXCLUSIVE lock on the table:
-- verify waits for it, and it waits for every open transaction that has touched the table.
-- Run it with a lock_timeout (SET lock_timeout = '5s'; ALTER EXTENSION keypal UPDATE;) and
-- try again if it times out.
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
RETURNS jsonb LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN '{}'::jsonb
        || CASE WHEN o.id IS DISTINCT FROM n.id THEN jsonb_build_object('id', jsonb_build_object('old', o.id, 'new', n.id)) ELSE '{}' END
        || CASE WHEN o.algorithm IS DISTINCT FROM n.algorithm THEN jsonb_build_object('algorithm', jsonb_build_object('old', o.algorithm, 'new', n.algorithm)) ELSE '{}' END
        || CASE WHEN o.owner_id IS DISTINCT FROM n.owner_id THEN jsonb_build_object('owner_id', jsonb_build_object('old', o.owner_id, 'new', n.owner_id)) ELSE '{}' END
        || CASE WHEN o.org_id IS DISTINCT FROM n.org_id THEN jsonb_build_object('org_id', jsonb_build_object('old', o.org_id, 'new', n.org_id)) ELSE '{}' END
        || CASE WHEN o.env IS DISTINCT FROM n.env THEN jsonb_build_object('env', jsonb_build_object('old', o.env, 'new', n.env)) ELSE '{}' END
        || CASE WHEN o.name IS DISTINCT FROM n.name THEN jsonb_build_object('name', jsonb_build_object('old', o.name, 'new', n.name)) ELSE '{}' END
        || CASE WHEN o.description IS DISTINCT FROM n.description THEN jsonb_build_object('description', jsonb_build_object('old', o.description, 'new', n.description)) ELSE '{}' END
        || CASE WHEN o.scopes IS DISTINCT FROM n.scopes THEN jsonb_build_object('scopes', jsonb_build_object('old', o.scopes, 'new', n.scopes)) ELSE '{}' END
        || CASE WHEN o.resources IS DISTINCT FROM n.resources THEN jsonb_build_object('resources', jsonb_build_object('old', o.resources, 'new', n.resources)) ELSE '{}' END
        || CASE WHEN o.tags IS DISTINCT FROM n.tags THEN jsonb_build_object('tags', jsonb_build_object('old', o.tags, 'new', n.tags)) ELSE '{}' END
        || CASE WHEN o.metadata IS DISTINCT FROM n.metadata THEN jsonb_build_object('metadata', jsonb_build_object('old', o.metadata, 'new', n.metadata)) ELSE '{}' END
        || CASE WHEN o.enabled IS DISTINCT FROM n.enabled THEN jsonb_build_object('enabled', jsonb_build_object('old', o.enabled, 'new', n.enabled)) ELSE '{}' END
        || CASE WHEN o.created_at IS DISTINCT FROM n.created_at THEN jsonb_build_object('created_at', jsonb_build_object('old', o.created_at, 'new', n.created_at)) ELSE '{}' END
        || CASE WHEN o.expires_at IS DISTINCT FROM n.expires_at THEN jsonb_build_object('expires_at', jsonb_build_object('old', o.expires_at, 'new', n.expires_at)) ELSE '{}' END
        || CASE WHEN o.revoked_at IS DISTINCT FROM n.revoked_at THEN jsonb_build_object('revoked_at', jsonb_build_object('old', o.revoked_at, 'new', n.revoked_at)) ELSE '{}' END
        || CASE WHEN o.revoke_reason IS DISTINCT FROM n.revoke_reason THEN jsonb_build_object('revoke_reason', jsonb_build_object('old', o.revoke_reason, 'new', n.revoke_reason)) ELSE '{}' END
        || CASE WHEN o.revoked_by IS DISTINCT FROM n.revoked_by THEN jsonb_build_object('revoked_by', jsonb_build_object('old', o.revoked_by, 'new', n.revoked_by)) ELSE '{}' END
        || CASE WHEN o.rotated_from IS DISTINCT FROM n.rotated_from THEN jsonb_build_object('rotated_from', jsonb_build_object('old', o.rotated_from, 'new', n.rotated_from)) ELSE '{}' END
        || CASE WHEN o.rotated_to IS DISTINCT FROM n.rotated_to THEN jsonb_build_object('rotated_to', jsonb_build_object('old', o.rotated_to, 'new', n.rotated_to)) ELSE '{}' END
        || CASE WHEN o.parent_id IS DISTINCT FROM n.parent_id THEN jsonb_build_object('parent_id', jsonb_build_object('old', o.parent_id, 'new', n.parent_id)) ELSE '{}' END
        || CASE WHEN o.policy IS DISTINCT FROM n.policy THEN jsonb_build_object('policy', jsonb_build_object('old', o.policy, 'new', n.policy)) ELSE '{}' END
        || CASE WHEN o.rate_limit IS DISTINCT FROM n.rate_limit THEN jsonb_build_object('rate_limit', jsonb_build_object('old', o.rate_limit, 'new', n.rate_limit)) ELSE '{}' END
        || CASE WHEN o.quota IS DISTINCT FROM n.quota THEN jsonb_build_object('quota', jsonb_build_object('old', o.quota, 'new', n.quota)) ELSE '{}' END
        || CASE WHEN o.allowed_ips IS DISTINCT FROM n.allowed_ips THEN jsonb_build_object('allowed_ips', jsonb_build_object('old', o.allowed_ips, 'new', n.allowed_ips)) ELSE '{}' END
        || CASE WHEN o.blocked_ips IS DISTINCT FROM n.blocked_ips THEN jsonb_build_object('blocked_ips', jsonb_build_object('old', o.blocked_ips, 'new', n.blocked_ips)) ELSE '{}' END
        || CASE WHEN o.allowed_regions IS DISTINCT FROM n.allowed_regions THEN jsonb_build_object('allowed_regions', jsonb_build_object('old', o.allowed_regions, 'new', n.allowed_regions)) ELSE '{}' END
        || CASE WHEN o.blocked_regions IS DISTINCT FROM n.blocked_regions THEN jsonb_build_object('blocked_regions', jsonb_build_object('old', o.blocked_regions, 'new', n.blocked_regions)) ELSE '{}' END
        || CASE WHEN o.disable_at IS DISTINCT FROM n.disable_at THEN jsonb_build_object('disable_at', jsonb_build_object('old', o.disable_at, 'new', n.disable_at)) ELSE '{}' END
        || CASE WHEN o.revoke_at IS DISTINCT FROM n.revoke_at THEN jsonb_build_object('revoke_at', jsonb_build_object('old', o.revoke_at, 'new', n.revoke_at)) ELSE '{}' END
        || CASE WHEN o.notify_before IS DISTINCT FROM n.notify_before THEN jsonb_build_object('notify_before', jsonb_build_object('old', o.notify_before, 'new', n.notify_before)) ELSE '{}' END
        || CASE WHEN o.signing IS DISTINCT FROM n.signing THEN jsonb_build_object('signing', jsonb_build_object('old', o.signing, 'new', n.signing)) ELSE '{}' END;
END $$;

CREATE FUNCTION keypal.revoke_children(parents uuid[], moments timestamptz[], revokers text[])
RETURNS void LANGUAGE sql VOLATILE SET enable_nestloop = on SET enable_hashjoin = off SET enable_mergejoin = off AS $$
    -- A child already revoked (not merely scheduled to be, as in a rotation's grace) is
    -- left as it is: it was revoked once, and is not again.
    UPDATE keypal.keys c
       SET revoked_at = p.revoked_at, revoke_reason = 'parent revoked', revoked_by = p.revoked_by
      FROM unnest(parents, moments, revokers) AS p(id, revoked_at, revoked_by)
     WHERE c.parent_id = p.id
       AND (c.revoked_at IS NULL OR (c.revoked_at > p.revoked_at AND c.revoked_at > clock_timestamp()));
$$;

CREATE FUNCTION keypal.set_timers(ids uuid[], kinds text[], dues timestamptz[])
RETURNS bigint LANGUAGE sql VOLATILE SET enable_nestloop = on SET enable_hashjoin = off SET enable_mergejoin = off AS $$
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
    SELECT count(*) FROM set
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
RETURNS SETOF keypal.created_key LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp SET jit = off SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    cfg    keypal.settings := keypal.config();
    norm   jsonb[];
    groups bigint;
    grp    text;
    g_norm jsonb[];
    g_pref text[];
    g_idx  bigint[];
    m      keypal.created_key[];
    ix     bigint[];
BEGIN
    norm := ARRAY(SELECT keypal.normalize_options(u.s, coalesce(u.p, ''), true)
                    FROM unnest(specs, prefixes) WITH ORDINALITY AS u(s, p, i) ORDER BY u.i);
    SELECT count(DISTINCT coalesce(o->>'actor', '')) INTO groups FROM unnest(norm) AS o;
    IF groups = 0 THEN
        RETURN;
    ELSIF groups > 1 THEN
        CREATE TEMP TABLE IF NOT EXISTS "keypal created" (i bigint, k keypal.created_key) ON COMMIT DROP;
        TRUNCATE "keypal created";
    END IF;
    FOR grp, g_norm, g_pref, g_idx IN
        SELECT coalesce(u.o->>'actor', ''), array_agg(u.o ORDER BY u.i), array_agg(coalesce(u.p, '') ORDER BY u.i),
               array_agg(u.i ORDER BY u.i)
          FROM unnest(norm, prefixes) WITH ORDINALITY AS u(o, p, i)
         GROUP BY 1 ORDER BY min(u.i)
    LOOP
        PERFORM keypal.begin_change(keypal.actor(nullif(grp, '')), extra->>'action', extra->'context');
        -- (never norm[i] or prefixes[i]: subscripting a big array of variable-width elements
        -- walks it from the start, quadratic over a bulk call)
        WITH given AS MATERIALIZED (
            SELECT s.*,
                   CASE WHEN s.o ? 'policy' OR s.o ? 'parent_id' OR s.exp0 <= now()
                        THEN keypal.key_expiry(s.o, s.arg, s.exp0, s.scopes, s.res, s.ips) ELSE s.exp0 END AS exp,
                   -- A signing key's secret (derived, never stored; 55000 without keypal.signing_secret).
                   CASE WHEN coalesce((s.o->>'signing')::boolean, false) THEN keypal.signing_secret_for(s.id) END AS secret,
                   keypal.generate_key(coalesce(cfg.environments -> s.env ->> 'prefix', cfg.prefix),
                                       cfg.length, cfg.alphabet) AS body
              FROM (SELECT u.i, u.o, u.arg, b.id, b.env, b.c,
                           coalesce((b.c).scopes, '{}') AS scopes, coalesce((b.c).resources, '{}') AS res,
                           coalesce((b.c).allowed_ips, '{}') AS ips,
                           keypal.check_env(b.env, u.arg || 'env', cfg.environments) AS env_ok,
                           CASE WHEN u.o ? 'expires_in'
                                THEN now() + keypal.parse_duration(u.o->>'expires_in', u.arg || 'expires_in')
                                ELSE keypal.parse_timestamp(u.o->>'expires_at', u.arg || 'expires_at') END AS exp0,
                           keypal.parse_timestamp(u.o->>'disable_at', u.arg || 'disable_at') AS disable_at,
                           keypal.parse_timestamp(u.o->>'revoke_at', u.arg || 'revoke_at') AS revoke_at,
                           keypal.parse_duration(u.o->>'notify_before', u.arg || 'notify_before') AS notify_before
                      FROM unnest(g_norm, g_pref, g_idx) AS u(o, arg, i)
                     CROSS JOIN LATERAL (
                           SELECT gen_random_uuid() AS id, coalesce(u.o->>'env', cfg.default_env) AS env,
                                  jsonb_populate_record(NULL::keypal.keys, u.o - 'expires_at' - 'disable_at' - 'revoke_at'
                                                                        - 'notify_before' - 'enabled') AS c) b) s),
        keyed AS MATERIALIZED (
            SELECT g.*, CASE WHEN cfg.checksum THEN g.body || keypal.key_checksum(g.body, cfg.alphabet)
                             ELSE g.body END AS key
              FROM given g),
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
                   coalesce((k.c).blocked_regions, '{}'), k.disable_at, k.revoke_at, k.notify_before,
                   (extra->>'rotated_from')::uuid, k.secret IS NOT NULL
              FROM keyed k ORDER BY k.i)
        SELECT array_agg(ROW(k.key, k.id, k.exp, k.env, k.secret)::keypal.created_key ORDER BY k.i),
               array_agg(k.i ORDER BY k.i)
          INTO m, ix FROM keyed k;
        IF groups = 1 THEN
            PERFORM keypal.end_change();
            RETURN QUERY SELECT x.key, x.id, x.expires_at, x.env, x.signing_secret
                           FROM unnest(m, ix) AS x(key, id, expires_at, env, signing_secret, i) ORDER BY x.i;
            RETURN;
        END IF;
        INSERT INTO "keypal created"
        SELECT x.i, ROW(x.key, x.id, x.expires_at, x.env, x.signing_secret)::keypal.created_key
          FROM unnest(m, ix) AS x(key, id, expires_at, env, signing_secret, i);
    END LOOP;
    PERFORM keypal.end_change();
    RETURN QUERY SELECT (c.k).* FROM "keypal created" c ORDER BY c.i;
    TRUNCATE "keypal created";
END $$;

CREATE FUNCTION keypal.emit_events(events text[], key_ids uuid[], data jsonb[])
RETURNS bigint LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp SET jit = off SET plan_cache_mode = force_generic_plan AS $$
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
RETURNS jsonb LANGUAGE sql STABLE AS $$
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
RETURNS trigger LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET jit = off AS $$
DECLARE
    act text := coalesce(nullif(current_setting('keypal._action', true), ''), 'created');
    who text := keypal.change_actor();
    ids uuid[];
    data jsonb[];
BEGIN
    -- A statement that changed no key (the triggers fire for those too) costs nothing more.
    IF NOT EXISTS (SELECT 1 FROM keypal_new) THEN
        RETURN NULL;
    END IF;
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
RETURNS trigger LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET jit = off AS $$
BEGIN
    -- A statement that changed no key (the triggers fire for those too) costs nothing more.
    IF NOT EXISTS (SELECT 1 FROM keypal_old) THEN
        RETURN NULL;
    END IF;
    INSERT INTO keypal.audit_log (action, key_id, owner_id, org_id, actor, role, context)
    SELECT 'deleted', o.id, o.owner_id, o.org_id, keypal.change_actor(), session_user, keypal.change_context()
      FROM keypal_old o;
    RETURN NULL;
END $$;

CREATE FUNCTION keypal.audit_updated_keys()
RETURNS trigger LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET jit = off SET enable_nestloop = off AS $$
DECLARE
    given text := nullif(current_setting('keypal._action', true), '');
    who   text := keypal.change_actor();
    ctx   jsonb := keypal.change_context();
    acts  text[];
    ids   uuid[];
    data  jsonb[];
BEGIN
    -- A statement that changed no key (the triggers fire for those too) costs nothing more.
    IF NOT EXISTS (SELECT 1 FROM keypal_new) THEN
        RETURN NULL;
    END IF;
    WITH changed AS (
        SELECT row_number() OVER () AS n, a.act, c.r, c.changes
          FROM (SELECT x.r, x.old_r, keypal.key_changes(x.old_r, x.r) AS changes
                  FROM (SELECT ROW(n.*)::keypal.keys AS r, ROW(o.*)::keypal.keys AS old_r,
                               o.last_used_at AS used_before, n.last_used_at AS used_after
                          FROM keypal_new n JOIN keypal_old o USING (id)) x
                 -- A write of last_used_at (the flush worker's) is not a change anyone made.
                 WHERE x.used_before IS NOT DISTINCT FROM x.used_after) c
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
RETURNS trigger LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET jit = off AS $$
DECLARE
    importing boolean := current_setting('keypal._action', true) = 'imported';
    armed     bigint;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM keypal_new) THEN
        RETURN NULL;
    END IF;
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
       -- (not a key verify already calls revoked: lock_key refuses those one at a time)
       AND (k.revoked_at IS NULL OR k.revoked_at > clock_timestamp())
       AND (k.revoke_at IS NULL OR k.revoke_at > clock_timestamp())
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
RETURNS trigger LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET jit = off SET enable_nestloop = off AS $$
DECLARE
    parents  uuid[];
    moments  timestamptz[];
    revokers text[];
BEGIN
    -- A statement that changed no key (the triggers fire for those too) costs nothing more.
    IF NOT EXISTS (SELECT 1 FROM keypal_new) THEN
        RETURN NULL;
    END IF;
    SELECT array_agg(p.id), array_agg(p.revoked_at), array_agg(p.revoked_by) INTO parents, moments, revokers
      FROM keypal_new p JOIN keypal_old o USING (id)
     WHERE p.revoked_at IS NOT NULL AND (o.revoked_at IS NULL OR p.revoked_at < o.revoked_at);
    -- (the UPDATE sets this trigger off again: it ends where no key was newly revoked)
    IF parents IS NOT NULL THEN
        PERFORM keypal.revoke_children(parents, moments, revokers);
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION keypal.arm_timers()
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
     WHERE (o.disable_at, o.revoke_at, o.expires_at, o.notify_before, o.enabled, o.revoked_at)
           IS DISTINCT FROM (n.disable_at, n.revoke_at, n.expires_at, n.notify_before, n.enabled, n.revoked_at)
       AND (n.revoked_at <= now()
            OR keypal.timer_due(ROW(o.*)::keypal.keys, w.kind)
               IS DISTINCT FROM keypal.timer_due(ROW(n.*)::keypal.keys, w.kind));
    IF ids IS NOT NULL THEN
        PERFORM keypal.timers_armed(keypal.set_timers(ids, kinds, dues));
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION keypal.maintenance_batch(batch_size integer, t0 timestamptz, cfg keypal.settings)
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

CREATE OR REPLACE FUNCTION keypal_import(data jsonb DEFAULT NULL, on_conflict text DEFAULT 'error', actor text DEFAULT NULL)
RETURNS TABLE (imported bigint, skipped bigint, overwritten bigint)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off AS $$
DECLARE
    mode   text := lower(on_conflict);
    cfg    keypal.settings := keypal.config();
    bad    record;
    n_all  bigint;
    n_new  bigint := 0;
    n_over bigint := 0;
    ctx    jsonb;
BEGIN
    IF mode IS NULL OR mode NOT IN ('skip', 'overwrite', 'error') THEN
        RAISE EXCEPTION 'invalid on_conflict: %, must be skip, overwrite or error', quote_nullable(on_conflict)
            USING ERRCODE = '22023';
    END IF;
    IF jsonb_typeof(data) IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION 'invalid data: must be a JSON array of key records (keypal_export''s, or the TypeScript keypal''s {id, keyHash, metadata})'
            USING ERRCODE = '22023';
    END IF;

    -- 1. Every record is checked and converted before anything is written; the first bad
    -- one raises, naming its index and field. (Dropped at the end; an error rolls it back.)
    -- A keypal record's metadata is taken as it came (no number rounded on the way);
    -- rate_limit keeps a JSON null (no limit, over any default), which is not SQL NULL.
    CREATE TEMP TABLE "keypal import" ON COMMIT DROP AS
    SELECT (e.n - 1)::integer AS n, 'i'::"char" AS act, x.obj->>'_source' AS source, r.*,
           keypal.parse_duration(x.obj->>'notify_before', format('data[%s].notify_before', e.n - 1)) AS notify,
           CASE WHEN x.obj->>'_source' = 'keypal' AND jsonb_typeof(e.v->'metadata') = 'object' THEN e.v->'metadata'
                ELSE r.metadata END AS meta,
           x.obj->'rate_limit' AS limits
      FROM jsonb_array_elements(data) WITH ORDINALITY AS e(v, n)
     CROSS JOIN LATERAL keypal.import_record(e.v::text, (e.n - 1)::integer) AS x(obj)
     CROSS JOIN LATERAL jsonb_populate_record(NULL::keypal.keys, x.obj - 'notify_before') AS r;
    GET DIAGNOSTICS n_all = ROW_COUNT;
    ANALYZE pg_temp."keypal import";

    SELECT d.n, d.field, d.first INTO bad FROM (
        SELECT t.n, 'id' AS field, min(t.n) OVER (PARTITION BY t.id) AS first FROM pg_temp."keypal import" t
        UNION ALL
        SELECT t.n, 'key_hash', min(t.n) OVER (PARTITION BY t.key_hash) FROM pg_temp."keypal import" t) d
     WHERE d.n <> d.first ORDER BY d.n LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'invalid data[%].%: the same % as data[%] (a key appears once)', bad.n, bad.field,
            bad.field, bad.first USING ERRCODE = '22023';
    END IF;
    PERFORM keypal.check_env(x.env, format('data[%s].env', x.n), cfg.environments)   -- the first bad record raises
       FROM (SELECT t.n, t.env FROM pg_temp."keypal import" t WHERE t.env IS NOT NULL ORDER BY t.n OFFSET 0) AS x;
    SELECT t.n, t.policy INTO bad FROM pg_temp."keypal import" t
     WHERE t.policy IS NOT NULL AND NOT EXISTS (SELECT 1 FROM keypal.policies p WHERE p.name = t.policy)
     ORDER BY t.n LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'invalid data[%].policy: no policy named % (define it first: keypal_define_policy)',
            bad.n, quote_literal(bad.policy) USING ERRCODE = '22023';
    END IF;

    -- Conflicts with keys already here: by id (on_conflict decides), and a hash that another
    -- key holds (never taken: it is another key; skipped with skip). An existing key's hash
    -- never changes: a record with another hash is another key, under another id.
    IF mode = 'error' THEN
        SELECT t.n, t.id INTO bad FROM pg_temp."keypal import" t JOIN keypal.keys k ON k.id = t.id
         ORDER BY t.n LIMIT 1;
        IF FOUND THEN
            RAISE EXCEPTION 'invalid data[%].id: a key with id % exists', bad.n, bad.id
                USING ERRCODE = '23505',
                      HINT = 'on_conflict => ''skip'' leaves existing keys as they are; ''overwrite'' replaces them';
        END IF;
    END IF;
    IF mode <> 'skip' THEN
        SELECT t.n, k.id INTO bad FROM pg_temp."keypal import" t JOIN keypal.keys k ON k.key_hash = t.key_hash
         WHERE k.id <> t.id ORDER BY t.n LIMIT 1;
        IF FOUND THEN
            RAISE EXCEPTION 'invalid data[%].key_hash: key % already has this hash', bad.n, bad.id
                USING ERRCODE = '23505';
        END IF;
        SELECT t.n, k.id INTO bad FROM pg_temp."keypal import" t JOIN keypal.keys k ON k.id = t.id
         WHERE k.key_hash <> t.key_hash ORDER BY t.n LIMIT 1;
        IF FOUND THEN
            RAISE EXCEPTION 'invalid data[%].key_hash: key % has another hash (a key''s hash never changes: import a new key under a new id)',
                bad.n, bad.id USING ERRCODE = '22023';
        END IF;
    END IF;
    -- (With error, nothing is marked: a key another transaction commits meanwhile under an id
    -- of the data makes the INSERT below fall short, and that refuses.)
    UPDATE pg_temp."keypal import" t SET act = CASE WHEN mode = 'skip' THEN 's' ELSE 'o' END
     WHERE mode <> 'error'
       AND (EXISTS (SELECT 1 FROM keypal.keys k WHERE k.id = t.id)
            OR mode = 'skip' AND EXISTS (SELECT 1 FROM keypal.keys k WHERE k.key_hash = t.key_hash));

    -- Links name keys written by this import or already here. Keys to overwrite are locked
    -- first, in id order (two imports overwriting the same keys wait in turn), and what
    -- they are then is what the overwrite keeps (a revocation); then the other existing
    -- parents FOR SHARE (as keypal_create locks its parent): a revoke of one waits for this
    -- transaction, then cascades to the children it wrote.
    SELECT t.n, l.field, l.ref, l.ref = t.id AS self,
           EXISTS (SELECT 1 FROM pg_temp."keypal import" o WHERE o.id = l.ref) AS skipped INTO bad
      FROM pg_temp."keypal import" t,
           LATERAL (VALUES ('parent_id', t.parent_id), ('rotated_from', t.rotated_from),
                           ('rotated_to', t.rotated_to)) AS l(field, ref)
     WHERE t.act <> 's' AND l.ref IS NOT NULL
       AND (l.ref = t.id
            OR NOT EXISTS (SELECT 1 FROM pg_temp."keypal import" o WHERE o.id = l.ref AND o.act <> 's')
               AND NOT EXISTS (SELECT 1 FROM keypal.keys k WHERE k.id = l.ref))
     ORDER BY t.n LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'invalid data[%].%: %', bad.n, bad.field,
            CASE WHEN bad.self THEN 'a key cannot name itself'
                 WHEN bad.skipped THEN format('key %s is in the data but skipped (its hash is another key''s here)', bad.ref)
                 ELSE format('no key %s in the data or in this database', bad.ref) END
            USING ERRCODE = CASE WHEN bad.self THEN '22023' ELSE '23503' END;
    END IF;
    PERFORM 1 FROM keypal.keys k
     WHERE k.id IN (SELECT t.id FROM pg_temp."keypal import" t WHERE t.act = 'o')
     ORDER BY k.id FOR NO KEY UPDATE;
    PERFORM 1 FROM keypal.keys p
     WHERE p.id IN (SELECT t.parent_id FROM pg_temp."keypal import" t WHERE t.act <> 's')
       AND p.id NOT IN (SELECT t.id FROM pg_temp."keypal import" t WHERE t.act = 'o')
     ORDER BY p.id FOR SHARE;

    -- 2. Written as one change: the audit log says imported for every key written.
    ctx := jsonb_build_object('on_conflict', mode, 'records',
               (SELECT jsonb_object_agg(c.source, c.n) FROM (SELECT t.source, count(*) AS n
                                                              FROM pg_temp."keypal import" t GROUP BY 1) c));
    PERFORM keypal.begin_change(keypal.actor(actor), 'imported', ctx);
    BEGIN
        INSERT INTO keypal.keys (id, key_hash, algorithm, owner_id, org_id, env, name, description, scopes,
                                 resources, tags, metadata, enabled, created_at, updated_at, expires_at,
                                 last_used_at, revoked_at, revoke_reason, revoked_by, rotated_from, rotated_to,
                                 parent_id, policy, rate_limit, quota, allowed_ips, blocked_ips, allowed_regions,
                                 blocked_regions, disable_at, revoke_at, notify_before, signing)
        SELECT t.id, t.key_hash, t.algorithm, t.owner_id, t.org_id, t.env, t.name, t.description,
               coalesce(t.scopes, '{}'), coalesce(t.resources, '{}'), coalesce(t.tags, '{}'),
               coalesce(t.meta, '{}'), coalesce(t.enabled, true), coalesce(t.created_at, now()),
               coalesce(t.updated_at, t.created_at, now()), t.expires_at, t.last_used_at, t.revoked_at,
               t.revoke_reason, t.revoked_by, t.rotated_from, t.rotated_to, t.parent_id, t.policy,
               t.limits, t.quota, coalesce(t.allowed_ips, '{}'), coalesce(t.blocked_ips, '{}'),
               coalesce(t.allowed_regions, '{}'), coalesce(t.blocked_regions, '{}'), t.disable_at,
               t.revoke_at, t.notify, coalesce(t.signing, false)
          FROM pg_temp."keypal import" t
         WHERE t.act = 'i'
         ORDER BY t.n
            ON CONFLICT DO NOTHING;   -- only a key another transaction wrote meanwhile (see below)
        GET DIAGNOSTICS n_new = ROW_COUNT;
    EXCEPTION WHEN foreign_key_violation THEN
        RAISE EXCEPTION 'invalid data: a key it links to was removed or skipped meanwhile: %', SQLERRM
            USING ERRCODE = '23503';
    END;
    IF n_new < (SELECT count(*) FROM pg_temp."keypal import" t WHERE t.act = 'i') AND mode <> 'skip' THEN
        RAISE EXCEPTION 'a key with the same id or hash as one in the data was created meanwhile (by another transaction); nothing imported'
            USING ERRCODE = '23505', HINT = 'run the import again';
    END IF;
    -- Overwriting never brings a revoked key back, nor one whose revocation is pending (a
    -- rotation's grace, a revoke_at): what it has of that is kept, or made earlier by the
    -- record. Its rotation link stays. last_used_at is written apart below (an update of it
    -- alone is the worker's kind, neither audited nor touching updated_at).
    UPDATE keypal.keys k
       SET algorithm = t.algorithm, owner_id = t.owner_id, org_id = t.org_id,
           env = t.env, name = t.name, description = t.description, scopes = coalesce(t.scopes, '{}'),
           resources = coalesce(t.resources, '{}'), tags = coalesce(t.tags, '{}'),
           metadata = coalesce(t.meta, '{}'), enabled = coalesce(t.enabled, true),
           created_at = coalesce(t.created_at, k.created_at), expires_at = t.expires_at,
           revoked_at = CASE WHEN k.revoked_at IS NULL THEN t.revoked_at ELSE least(k.revoked_at, t.revoked_at) END,
           revoke_reason = CASE WHEN k.revoked_at IS NULL OR t.revoked_at < k.revoked_at THEN t.revoke_reason ELSE k.revoke_reason END,
           revoked_by = CASE WHEN k.revoked_at IS NULL OR t.revoked_at < k.revoked_at THEN t.revoked_by ELSE k.revoked_by END,
           revoke_at = CASE WHEN k.revoke_at IS NULL THEN t.revoke_at ELSE least(k.revoke_at, t.revoke_at) END,
           rotated_from = t.rotated_from, rotated_to = coalesce(k.rotated_to, t.rotated_to), parent_id = t.parent_id,
           policy = t.policy, rate_limit = t.limits, quota = t.quota,
           allowed_ips = coalesce(t.allowed_ips, '{}'), blocked_ips = coalesce(t.blocked_ips, '{}'),
           allowed_regions = coalesce(t.allowed_regions, '{}'),
           blocked_regions = coalesce(t.blocked_regions, '{}'), disable_at = t.disable_at,
           notify_before = t.notify, signing = coalesce(t.signing, false)
      FROM pg_temp."keypal import" t
     WHERE t.act = 'o' AND k.id = t.id;
    GET DIAGNOSTICS n_over = ROW_COUNT;
    IF n_over < (SELECT count(*) FROM pg_temp."keypal import" t WHERE t.act = 'o') THEN
        RAISE EXCEPTION 'a key to overwrite was deleted meanwhile (by another transaction); nothing imported'
            USING ERRCODE = '40001', HINT = 'run the import again';
    END IF;
    UPDATE keypal.keys k SET last_used_at = t.last_used_at
      FROM pg_temp."keypal import" t
     WHERE t.act = 'o' AND k.id = t.id AND t.last_used_at > k.last_used_at IS NOT FALSE AND t.last_used_at IS NOT NULL;

    -- 3. What only the whole picture shows (an error here undoes all of the above): live
    -- children outside their parent's scopes (those written, and those already here under
    -- a parent overwritten), as keypal_update refuses to make them; depth and cycles. (A
    -- child outliving its parent, or live under a revoked one, is a state keypal allows —
    -- verify judges ancestors — and imports as it is.)
    SELECT x.n, c.id, c.id = x.id AS own INTO bad
      FROM (SELECT t.n, t.id, t.id AS child FROM pg_temp."keypal import" t
             WHERE t.act <> 's' AND t.parent_id IS NOT NULL
            UNION ALL
            SELECT t.n, t.id, c.id FROM pg_temp."keypal import" t JOIN keypal.keys c ON c.parent_id = t.id
             WHERE t.act = 'o') AS x
      JOIN keypal.keys c ON c.id = x.child
      JOIN keypal.keys p ON p.id = c.parent_id
     WHERE (c.revoked_at IS NULL OR c.revoked_at > clock_timestamp())
       AND (c.revoke_at IS NULL OR c.revoke_at > clock_timestamp())
       AND NOT keypal.scopes_within(c.scopes, c.resources, p.scopes, p.resources)
     ORDER BY x.n LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'invalid data[%].%: %', bad.n, CASE WHEN bad.own THEN 'parent_id' ELSE 'scopes' END,
            CASE WHEN bad.own THEN 'a child key''s scopes must be within its parent''s'
                 ELSE format('key %s, a child of this one, would hold scopes outside it', bad.id) END
            USING ERRCODE = '22023';
    END IF;
    SELECT t.n INTO bad FROM pg_temp."keypal import" t
     WHERE t.act <> 's' AND t.parent_id IS NOT NULL AND keypal.depth_of(t.id) > keypal.max_hierarchy_depth()
     ORDER BY t.n LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'invalid data[%].parent_id: a key hierarchy is at most % levels deep, and has no cycles',
            bad.n, keypal.max_hierarchy_depth() USING ERRCODE = '22023';
    END IF;

    -- Keys of shapes nobody recorded are here now: verify stops refusing keys unlooked by
    -- their checksum (it looks every key up; a wrong checksum is then INVALID_FORMAT).
    IF n_new + n_over > 0 THEN
        INSERT INTO keypal.settings AS s (singleton, issued) VALUES (true, '[{"imported": true}]')
            ON CONFLICT (singleton) DO UPDATE
            SET issued = CASE WHEN s.issued @> '[{"imported": true}]' THEN s.issued
                              ELSE s.issued || '[{"imported": true}]' END;
    END IF;
    PERFORM keypal.end_change();
    DROP TABLE pg_temp."keypal import";
    RETURN QUERY SELECT n_new, n_all - n_new - n_over, n_over;
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

REVOKE ALL ON FUNCTION keypal.revoke_children(uuid[], timestamptz[], text[]) FROM PUBLIC;

REVOKE ALL ON FUNCTION keypal.set_timers(uuid[], text[], timestamptz[]) FROM PUBLIC;

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
