-- keypal 0.3.0 -> 0.4.0 (ALTER EXTENSION keypal UPDATE).
-- Creating keys costs less per call: the functions each change runs once (keypal_create and
-- its read-only / full-access forms, create_key, options, begin_change, end_change, config,
-- restoring, depth_of; keypal_enable, keypal_disable, their _all forms and the webhook toggles) are PL/pgSQL, whose plans are kept for the session, where a SQL function's body
-- is parsed and planned again on every call; keypal.create_keys is Rust (it checks each
-- spec, makes its key and writes the rows by one prepared INSERT per actor, where the
-- PL/pgSQL version planned a query of a dozen steps); the new keys' timers are armed by the audit
-- trigger on INSERT (keys_audit), one trigger call where there were two. keypal_import
-- costs less: statistics only for the columns its checks use, no ON CONFLICT (a speculative
-- insertion per row) except with on_conflict => 'skip', notify_before parsed only when given.
-- keypal.revoked_now: one definition of "revoked now, as verify judges it" for lock_key,
-- check_children, set_enabled_where and keypal_import (check_children judged a revocation by
-- the transaction's start, not the current time).
-- keypal_configure(limit_split => n) (a new settings column): each of n servers, a primary and
-- its standbys, enforces its share of every rate limit and quota. keypal_configure gains that
-- argument, so it is replaced: grants made on it must be made again.
-- It drops a trigger on keypal.keys, which takes an ACCESS EXCLUSIVE lock on the table: verify
-- waits for it, and it waits for every open transaction that has touched the table. Run it
-- with a lock_timeout (SET lock_timeout = '5s'; ALTER EXTENSION keypal UPDATE;) and try again
-- if it times out.
-- tests/shell/upgrade.t checks that this leaves the schema a fresh 0.4.0 install makes.
\echo Use "ALTER EXTENSION keypal UPDATE TO '0.4.0'" to load this file. \quit

ALTER TABLE keypal.settings ADD COLUMN limit_split integer NOT NULL DEFAULT 1 CHECK (limit_split BETWEEN 1 AND 1000);

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
               '{"events": "30d", "webhook_deliveries": "30d", "usage": "400d"}'::jsonb, now(), false, '[]'::jsonb,
               1)::keypal.settings;
END $$;

CREATE OR REPLACE FUNCTION keypal.revoked_now(revoked_at timestamptz, revoke_at timestamptz)
RETURNS boolean LANGUAGE sql VOLATILE AS $$
    SELECT coalesce(revoked_at <= clock_timestamp() OR revoke_at <= clock_timestamp(), false)
$$;
REVOKE ALL ON FUNCTION keypal.revoked_now(timestamptz, timestamptz) FROM PUBLIC;

CREATE OR REPLACE FUNCTION keypal.lock_key(key_id uuid, action text)
RETURNS keypal.keys LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    k keypal.keys;
BEGIN
    -- FOR NO KEY UPDATE: the flush worker's foreign-key checks (FOR KEY SHARE) on this key
    -- must not wait for a management transaction to end.
    SELECT * INTO k FROM keypal.keys WHERE id = key_id FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        PERFORM keypal.key_not_found(key_id, 'id');
    END IF;
    -- A passed revoke_at revoked the key already (verify says REVOKED), judged as verify
    -- judges: at the current time.
    IF keypal.revoked_now(k.revoked_at, k.revoke_at) THEN
        RAISE EXCEPTION 'CANNOT_MODIFY_REVOKED: key % is revoked and cannot be %', key_id, action
            USING ERRCODE = '55000', DETAIL = 'CANNOT_MODIFY_REVOKED';
    END IF;
    RETURN k;
END $$;

CREATE OR REPLACE FUNCTION keypal.depth_of(key_id uuid)
RETURNS integer LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (WITH RECURSIVE up(id, depth) AS (
                SELECT k.parent_id, 1 FROM keypal.keys k WHERE k.id = depth_of.key_id
                UNION ALL
                SELECT k.parent_id, up.depth + 1 FROM keypal.keys k JOIN up ON k.id = up.id
                 WHERE up.depth <= keypal.max_hierarchy_depth())
            SELECT max(up.depth) FROM up);
END $$;

CREATE OR REPLACE FUNCTION keypal.check_children(key_id uuid, scopes text[], resources jsonb)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    child uuid;
BEGIN
    SELECT c.id INTO child FROM keypal.keys c
     WHERE c.parent_id = check_children.key_id AND NOT keypal.revoked_now(c.revoked_at, c.revoke_at)
       AND NOT keypal.scopes_within(c.scopes, c.resources, check_children.scopes, check_children.resources)
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'invalid scopes: child key % holds scopes outside % (a child''s scopes must be a subset of its parent''s)',
            child, check_children.scopes
            USING ERRCODE = '22023',
                  HINT = 'narrow or revoke the child keys first';
    END IF;
END $$;

CREATE OR REPLACE FUNCTION keypal.set_enabled_where(owner text, org text, on_off boolean, actor text)
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
       AND NOT keypal.revoked_now(k.revoked_at, k.revoke_at)
       AND (k.enabled <> on_off OR (on_off AND k.disable_at <= clock_timestamp()));
    GET DIAGNOSTICS n = ROW_COUNT;
    PERFORM keypal.end_change();
    RETURN n;
END $$;

CREATE OR REPLACE FUNCTION keypal_enable(id uuid DEFAULT NULL, actor text DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN keypal.set_enabled(id, true, actor);
END $$;

CREATE OR REPLACE FUNCTION keypal_disable(id uuid DEFAULT NULL, actor text DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN keypal.set_enabled(id, false, actor);
END $$;

CREATE OR REPLACE FUNCTION keypal_enable_all(owner_id text DEFAULT NULL, org_id text DEFAULT NULL, actor text DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN keypal.set_enabled_where(owner_id, org_id, true, actor);
END $$;

CREATE OR REPLACE FUNCTION keypal_disable_all(owner_id text DEFAULT NULL, org_id text DEFAULT NULL, actor text DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN keypal.set_enabled_where(owner_id, org_id, false, actor);
END $$;

CREATE OR REPLACE FUNCTION keypal_enable_webhook(id bigint DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN keypal.set_webhook_enabled(id, true);
END $$;

CREATE OR REPLACE FUNCTION keypal_disable_webhook(id bigint DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN keypal.set_webhook_enabled(id, false);
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

DROP FUNCTION keypal.create_keys(jsonb[], text[], jsonb);
CREATE FUNCTION keypal."create_keys"(
	"specs" jsonb[],
	"prefixes" TEXT[] DEFAULT '{}',
	"extra" jsonb DEFAULT '{}'
) RETURNS TABLE (
	"key" TEXT,
	"id" uuid,
	"expires_at" timestamp with time zone,
	"env" TEXT,
	"signing_secret" TEXT
)
VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'create_keys_wrapper';
REVOKE ALL ON FUNCTION keypal.create_keys(jsonb[], text[], jsonb) FROM PUBLIC;

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
    ctx jsonb;
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
    ctx := keypal.change_context();   -- (once, not per row)
    INSERT INTO keypal.audit_log (action, key_id, owner_id, org_id, actor, role, context)
    SELECT act, n.id, n.owner_id, n.org_id, who, session_user, ctx
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
    conflict text;
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
           CASE WHEN x.obj ? 'notify_before'
                THEN keypal.parse_duration(x.obj->>'notify_before', format('data[%s].notify_before', e.n - 1)) END AS notify,
           CASE WHEN x.obj->>'_source' = 'keypal' AND jsonb_typeof(e.v->'metadata') = 'object' THEN e.v->'metadata'
                ELSE r.metadata END AS meta,
           x.obj->'rate_limit' AS limits
      FROM jsonb_array_elements(data) WITH ORDINALITY AS e(v, n)
     CROSS JOIN LATERAL keypal.import_record(e.v::text, (e.n - 1)::integer) AS x(obj)
     CROSS JOIN LATERAL jsonb_populate_record(NULL::keypal.keys, CASE WHEN x.obj ? 'notify_before'
                                                                     THEN x.obj - 'notify_before' ELSE x.obj END) AS r;
    GET DIAGNOSTICS n_all = ROW_COUNT;
    -- Statistics for the columns the checks below join and filter on (all of them: a
    -- twentieth of the import's time, sorting metadata and scopes for nothing).
    ANALYZE pg_temp."keypal import" (n, act, source, id, key_hash, env, policy, parent_id, rotated_from, rotated_to);

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
    -- of the data makes the INSERT below fail, and that refuses.)
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
    -- ON CONFLICT only with skip: there a key another transaction wrote meanwhile is skipped.
    -- It costs a speculative insertion per row (a fifth of the INSERT); without it such a
    -- key makes the INSERT fail, and that refuses the import (the checks above left no other
    -- conflict). One statement text either way, planned once per import.
    BEGIN
        EXECUTE format($i$
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
         ORDER BY t.n %s$i$, CASE WHEN mode = 'skip' THEN 'ON CONFLICT DO NOTHING' ELSE '' END);
        GET DIAGNOSTICS n_new = ROW_COUNT;
    EXCEPTION
        WHEN foreign_key_violation THEN
            RAISE EXCEPTION 'invalid data: a key it links to was removed or skipped meanwhile: %', SQLERRM
                USING ERRCODE = '23503';
        WHEN unique_violation THEN
            GET STACKED DIAGNOSTICS conflict = CONSTRAINT_NAME;
            IF conflict NOT IN ('keys_pkey', 'keys_key_hash_key') THEN
                RAISE;   -- not a key's id or hash: as it came
            END IF;
            RAISE EXCEPTION 'a key with the same id or hash as one in the data was created meanwhile (by another transaction); nothing imported'
                USING ERRCODE = '23505', HINT = 'run the import again';
    END;
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
     WHERE NOT keypal.revoked_now(c.revoked_at, c.revoke_at)
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

DROP TRIGGER keys_timers_insert ON keypal.keys;
DROP FUNCTION keypal.arm_timers_inserted();

-- keypal_configure gains limit_split: replaced (grants made on the old one must be made again).
DROP FUNCTION keypal_configure(text, integer, text, text, text, jsonb, jsonb, text, text, jsonb, text, integer, text, integer, boolean, boolean);

CREATE OR REPLACE FUNCTION keypal_configure(prefix text DEFAULT NULL, length integer DEFAULT NULL,
                                 alphabet text DEFAULT NULL, algorithm text DEFAULT NULL,
                                 last_used_resolution text DEFAULT NULL, rate_limit jsonb DEFAULT NULL,
                                 environments jsonb DEFAULT NULL, default_env text DEFAULT NULL,
                                 audit_retention text DEFAULT NULL, retention jsonb DEFAULT NULL,
                                 webhook_timeout text DEFAULT NULL, webhook_max_attempts integer DEFAULT NULL,
                                 webhook_backoff text DEFAULT NULL, webhook_concurrency integer DEFAULT NULL,
                                 webhook_allow_private boolean DEFAULT NULL, checksum boolean DEFAULT NULL,
                                 limit_split integer DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    c keypal.settings := keypal.config();
    before keypal.settings := c;
BEGIN
    -- No argument: only read.
    IF num_nonnulls(prefix, length, alphabet, algorithm, last_used_resolution, rate_limit, environments,
                    default_env, audit_retention, retention, webhook_timeout, webhook_max_attempts,
                    webhook_backoff, webhook_concurrency, webhook_allow_private, checksum, limit_split) = 0 THEN
        RETURN to_jsonb(c) - 'singleton';
    END IF;
    c.prefix := coalesce(prefix, c.prefix);
    c.length := coalesce(length, c.length);
    c.alphabet := coalesce(alphabet, c.alphabet);
    c.algorithm := coalesce(lower(algorithm), c.algorithm);
    PERFORM keypal.check_format(c.prefix, c.length, c.alphabet, c.algorithm);
    c.algorithm := CASE WHEN c.algorithm LIKE '%512' THEN 'sha512' ELSE 'sha256' END;
    IF last_used_resolution IS NOT NULL THEN
        c.last_used_resolution := keypal.parse_duration(last_used_resolution, 'last_used_resolution', true);
    END IF;
    IF rate_limit IS NOT NULL THEN
        c.rate_limit := nullif(keypal.check_rate_limit(rate_limit, 'rate_limit'), 'null');
    END IF;
    IF environments IS NOT NULL THEN
        c.environments := nullif(keypal.check_environments(environments), 'null');
    END IF;
    IF default_env IS NOT NULL THEN
        c.default_env := nullif(default_env, '');
    END IF;
    PERFORM keypal.check_env(c.default_env, 'default_env', c.environments);
    IF retention IS NOT NULL THEN
        c.retention := keypal.merge_retention(c.retention, retention, 'retention');
    END IF;
    -- audit_retention: the audit log's entry of retention ('' keeps the log for good).
    IF audit_retention IS NOT NULL THEN
        c.retention := keypal.merge_retention(c.retention,
            jsonb_build_object('audit_log', CASE WHEN audit_retention = '' THEN 'null'::jsonb
                                                 ELSE to_jsonb(audit_retention) END), 'audit_retention');
    END IF;
    IF webhook_timeout IS NOT NULL THEN
        c.webhook_timeout := keypal.parse_duration(webhook_timeout, 'webhook_timeout');
        IF c.webhook_timeout > interval '5 minutes' THEN
            RAISE EXCEPTION 'invalid webhook_timeout: at most 5 minutes, got %', webhook_timeout USING ERRCODE = '22023';
        END IF;
    END IF;
    IF webhook_backoff IS NOT NULL THEN
        c.webhook_backoff := keypal.parse_duration(webhook_backoff, 'webhook_backoff');
    END IF;
    IF webhook_max_attempts IS NOT NULL THEN
        IF webhook_max_attempts NOT BETWEEN 1 AND 100 THEN
            RAISE EXCEPTION 'invalid webhook_max_attempts: between 1 and 100, got %', webhook_max_attempts USING ERRCODE = '22023';
        END IF;
        c.webhook_max_attempts := webhook_max_attempts;
    END IF;
    IF webhook_concurrency IS NOT NULL THEN
        IF webhook_concurrency NOT BETWEEN 1 AND 32 THEN
            RAISE EXCEPTION 'invalid webhook_concurrency: between 1 and 32, got %', webhook_concurrency USING ERRCODE = '22023';
        END IF;
        c.webhook_concurrency := webhook_concurrency;
    END IF;
    c.webhook_allow_private := coalesce(webhook_allow_private, c.webhook_allow_private);
    c.checksum := coalesce(keypal_configure.checksum, c.checksum);
    IF limit_split IS NOT NULL THEN
        IF limit_split NOT BETWEEN 1 AND 1000 THEN
            RAISE EXCEPTION 'invalid limit_split: the number of servers sharing each limit, 1 to 1000, got %',
                limit_split USING ERRCODE = '22023';
        END IF;
        c.limit_split := limit_split;
    END IF;
    -- Keys issued so far keep their shape: remember it, and the new one.
    IF (c.length, c.alphabet, c.checksum) IS DISTINCT FROM (before.length, before.alphabet, before.checksum) THEN
        c.issued := keypal.note_shape(keypal.note_shape(c.issued, before.length, before.alphabet, before.checksum),
                                      c.length, c.alphabet, c.checksum);
    END IF;
    c.updated_at := now();
    INSERT INTO keypal.settings AS s VALUES (c.*)
        ON CONFLICT (singleton) DO UPDATE
        SET prefix = EXCLUDED.prefix, length = EXCLUDED.length, alphabet = EXCLUDED.alphabet,
            algorithm = EXCLUDED.algorithm, last_used_resolution = EXCLUDED.last_used_resolution,
            rate_limit = EXCLUDED.rate_limit, environments = EXCLUDED.environments,
            default_env = EXCLUDED.default_env, retention = EXCLUDED.retention,
            webhook_timeout = EXCLUDED.webhook_timeout, webhook_max_attempts = EXCLUDED.webhook_max_attempts,
            webhook_backoff = EXCLUDED.webhook_backoff, webhook_concurrency = EXCLUDED.webhook_concurrency,
            webhook_allow_private = EXCLUDED.webhook_allow_private, checksum = EXCLUDED.checksum,
            issued = EXCLUDED.issued, limit_split = EXCLUDED.limit_split,
            updated_at = EXCLUDED.updated_at;
    RETURN to_jsonb(c) - 'singleton';
END $$;
COMMENT ON FUNCTION keypal_configure(text, integer, text, text, text, jsonb, jsonb, text, text, jsonb, text, integer, text, integer, boolean, boolean, integer) IS 'Changes keypal''s settings (prefix, length, alphabet, algorithm, last_used_resolution, rate_limit, environments, default_env, retention (what keypal_run_maintenance prunes: {"events": "30d", "webhook_deliveries": "30d", "usage": "400d", "audit_log": ...}), audit_retention, webhook_timeout, webhook_max_attempts, webhook_backoff, webhook_concurrency, webhook_allow_private, checksum (new keys end in a checksum verify checks without a lookup), limit_split (n servers each enforce their share of every rate limit and quota: a standby floor(limit / n), the primary the rest)); NULL leaves a setting, JSON null clears it; no argument only reads. Returns all settings as jsonb.';
REVOKE ALL ON FUNCTION keypal_configure(text, integer, text, text, text, jsonb, jsonb, text, text, jsonb, text, integer, text, integer, boolean, boolean, integer) FROM PUBLIC;
