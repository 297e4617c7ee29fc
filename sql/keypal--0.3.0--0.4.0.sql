-- keypal 0.3.0 -> 0.4.0 (ALTER EXTENSION keypal UPDATE).
-- Creating keys costs less per call: the functions each change runs once (keypal_create and
-- its read-only / full-access forms, create_key, options, begin_change, end_change, config,
-- restoring) are PL/pgSQL, whose plans are kept for the session, where a SQL function's body
-- is parsed and planned again on every call; the new keys' timers are armed by the audit
-- trigger on INSERT (keys_audit), one trigger call where there were two.
-- It drops a trigger on keypal.keys, which takes an ACCESS EXCLUSIVE lock on the table: verify
-- waits for it, and it waits for every open transaction that has touched the table. Run it
-- with a lock_timeout (SET lock_timeout = '5s'; ALTER EXTENSION keypal UPDATE;) and try again
-- if it times out.
-- tests/shell/upgrade.t checks that this leaves the schema a fresh 0.4.0 install makes.
\echo Use "ALTER EXTENSION keypal UPDATE TO '0.4.0'" to load this file. \quit

CREATE OR REPLACE FUNCTION keypal.config() RETURNS keypal.settings
LANGUAGE plpgsql STABLE AS $$
DECLARE
    s keypal.settings;
BEGIN
    SELECT * INTO s FROM keypal.settings;
    IF FOUND THEN
        RETURN s;
    END IF;
    RETURN ROW(true, '', 32, 'A-Za-z0-9', 'sha256', '60 seconds'::interval, NULL::jsonb, NULL::jsonb,
               NULL::text, '5 seconds'::interval, 8, '10 seconds'::interval, 4, false,
               '{"events": "30d", "webhook_deliveries": "30d", "usage": "400d"}'::jsonb, now(), false, '[]'::jsonb)::keypal.settings;
END $$;

CREATE OR REPLACE FUNCTION keypal.options(names text[], vals jsonb[])
RETURNS jsonb LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    RETURN (SELECT coalesce(jsonb_object_agg(t.n, t.v), '{}')
              FROM unnest(names, vals) AS t(n, v)
             WHERE t.v IS NOT NULL);
END $$;

CREATE OR REPLACE FUNCTION keypal.begin_change(actor text, action text DEFAULT NULL, context jsonb DEFAULT NULL)
RETURNS void LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM set_config('keypal._actor', coalesce(actor, ''), true),
            set_config('keypal._action', coalesce(action, ''), true),
            set_config('keypal._context', coalesce(context::text, ''), true);
END $$;

CREATE OR REPLACE FUNCTION keypal.end_change()
RETURNS void LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM keypal.begin_change(NULL);
END $$;

CREATE OR REPLACE FUNCTION keypal.restoring(relid oid)
RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    RETURN coalesce(current_setting('keypal._actor', true), '') = '' AND keypal.copying_into(relid);
END $$;

CREATE OR REPLACE FUNCTION keypal.create_key(opts jsonb, arg_prefix text DEFAULT '', extra jsonb DEFAULT '{}')
RETURNS keypal.created_key LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    made keypal.created_key;
BEGIN
    SELECT * INTO made FROM keypal.create_keys(ARRAY[opts], ARRAY[arg_prefix], extra);
    RETURN made;
END $$;

CREATE OR REPLACE FUNCTION keypal_create(
    owner_id text DEFAULT NULL, name text DEFAULT NULL, description text DEFAULT NULL,
    scopes text[] DEFAULT NULL, resources jsonb DEFAULT NULL, tags text[] DEFAULT NULL,
    metadata jsonb DEFAULT NULL, expires_in text DEFAULT NULL, expires_at timestamptz DEFAULT NULL,
    env text DEFAULT NULL, org_id text DEFAULT NULL, parent_id uuid DEFAULT NULL,
    policy text DEFAULT NULL, rate_limit jsonb DEFAULT NULL, quota jsonb DEFAULT NULL,
    allowed_ips text[] DEFAULT NULL, blocked_ips text[] DEFAULT NULL,
    allowed_regions text[] DEFAULT NULL, blocked_regions text[] DEFAULT NULL,
    disable_at timestamptz DEFAULT NULL, revoke_at timestamptz DEFAULT NULL,
    notify_before text DEFAULT NULL, signing boolean DEFAULT NULL, actor text DEFAULT NULL)
RETURNS SETOF keypal.created_key
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN QUERY SELECT * FROM keypal.create_keys(ARRAY[keypal.options(
        ARRAY['owner_id', 'name', 'description', 'scopes', 'resources', 'tags', 'metadata',
              'expires_in', 'expires_at', 'env', 'org_id', 'parent_id', 'policy', 'rate_limit',
              'quota', 'allowed_ips', 'blocked_ips', 'allowed_regions', 'blocked_regions',
              'disable_at', 'revoke_at', 'notify_before', 'signing', 'actor'],
        ARRAY[to_jsonb(owner_id), to_jsonb(name), to_jsonb(description), to_jsonb(scopes),
              resources, to_jsonb(tags), metadata, to_jsonb(expires_in), to_jsonb(expires_at),
              to_jsonb(env), to_jsonb(org_id), to_jsonb(parent_id), to_jsonb(policy), rate_limit,
              quota, to_jsonb(allowed_ips), to_jsonb(blocked_ips), to_jsonb(allowed_regions),
              to_jsonb(blocked_regions), to_jsonb(disable_at), to_jsonb(revoke_at),
              to_jsonb(notify_before), to_jsonb(signing), to_jsonb(actor)])], ARRAY['']);
END $$;

CREATE OR REPLACE FUNCTION keypal_create_read_only(
    owner_id text DEFAULT NULL, name text DEFAULT NULL, description text DEFAULT NULL,
    tags text[] DEFAULT NULL, metadata jsonb DEFAULT NULL, expires_in text DEFAULT NULL,
    expires_at timestamptz DEFAULT NULL, env text DEFAULT NULL, org_id text DEFAULT NULL,
    parent_id uuid DEFAULT NULL, rate_limit jsonb DEFAULT NULL, quota jsonb DEFAULT NULL,
    allowed_ips text[] DEFAULT NULL, actor text DEFAULT NULL)
RETURNS SETOF keypal.created_key
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN QUERY SELECT * FROM @extschema@.keypal_create(owner_id => owner_id, name => name,
        description => description, scopes => '{read}', tags => tags, metadata => metadata,
        expires_in => expires_in, expires_at => expires_at, env => env, org_id => org_id,
        parent_id => parent_id, rate_limit => rate_limit, quota => quota,
        allowed_ips => allowed_ips, actor => actor);
END $$;

CREATE OR REPLACE FUNCTION keypal_create_full_access(
    owner_id text DEFAULT NULL, name text DEFAULT NULL, description text DEFAULT NULL,
    tags text[] DEFAULT NULL, metadata jsonb DEFAULT NULL, expires_in text DEFAULT NULL,
    expires_at timestamptz DEFAULT NULL, env text DEFAULT NULL, org_id text DEFAULT NULL,
    parent_id uuid DEFAULT NULL, rate_limit jsonb DEFAULT NULL, quota jsonb DEFAULT NULL,
    allowed_ips text[] DEFAULT NULL, actor text DEFAULT NULL)
RETURNS SETOF keypal.created_key
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN QUERY SELECT * FROM @extschema@.keypal_create(owner_id => owner_id, name => name,
        description => description, scopes => '{read,write,admin}', tags => tags,
        metadata => metadata, expires_in => expires_in, expires_at => expires_at, env => env,
        org_id => org_id, parent_id => parent_id, rate_limit => rate_limit, quota => quota,
        allowed_ips => allowed_ips, actor => actor);
END $$;

CREATE OR REPLACE FUNCTION keypal.audit_inserted_keys()
RETURNS trigger LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET jit = off AS $$
DECLARE
    act text := coalesce(nullif(current_setting('keypal._action', true), ''), 'created');
    who text := keypal.change_actor();
    ids uuid[];
    data jsonb[];
    armed bigint;
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
    -- The new keys' timers (one trigger for all of it: each trigger call has its cost).
    WITH set AS (
        INSERT INTO keypal.key_timers AS t (key_id, kind, due_at)
        SELECT a.key_id, a.kind, a.due
          FROM (SELECT n.id AS key_id, w.kind,
                       keypal.timer_to_arm(ROW(n.*)::keypal.keys, w.kind, act = 'imported') AS due
                  FROM keypal_new n CROSS JOIN unnest(ARRAY['disable', 'revoke', 'expiring', 'expired']) AS w(kind)) a
         WHERE a.due IS NOT NULL
            ON CONFLICT (key_id, kind) DO UPDATE SET due_at = EXCLUDED.due_at
        RETURNING 1)
    SELECT count(*) INTO armed FROM set;
    PERFORM keypal.timers_armed(armed);
    RETURN NULL;
END $$;

DROP TRIGGER keys_timers_insert ON keypal.keys;
DROP FUNCTION keypal.arm_timers_inserted();
