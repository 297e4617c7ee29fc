-- keypal 0.6.0 -> 0.7.0 (ALTER EXTENSION keypal UPDATE).
-- Revoking one key costs about half of what it did, rotating one about 60 %; nothing in any
-- function's arguments, results or privileges changes. keypal.revoke_children and
-- keypal.set_timers (run by the keys' UPDATE triggers), keypal.settings_of,
-- keypal.count_quota_use (keypal_track_usage of a key with a quota: a third cheaper) and
-- keypal.emit_event are PL/pgSQL, planned once per session instead of at every call (a SQL
-- function with a SET clause is parsed and planned at each); the revocation cascade, and
-- keypal_rotate's move of the children (keypal.move_children, new), run their UPDATE only
-- when there is a child to change (an UPDATE of no rows still sets off the keys' statement
-- triggers); the cascade's probe and its UPDATE share one condition, keypal.cascades_to
-- (new, inlined). The probes for children (and keypal.check_children's) read the parent_id
-- index, never the table: sequential scans off, and JIT with them.

CREATE OR REPLACE FUNCTION keypal.settings_of(k keypal.keys)
RETURNS jsonb LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN keypal.options(
        ARRAY['owner_id', 'name', 'description', 'scopes', 'resources', 'tags', 'metadata', 'env',
              'org_id', 'parent_id', 'policy', 'rate_limit', 'quota', 'allowed_ips', 'blocked_ips',
              'allowed_regions', 'blocked_regions', 'disable_at', 'revoke_at', 'notify_before',
              'enabled', 'signing'],
        ARRAY[to_jsonb(k.owner_id), to_jsonb(k.name), to_jsonb(k.description), to_jsonb(k.scopes),
              k.resources, to_jsonb(k.tags), k.metadata, to_jsonb(k.env), to_jsonb(k.org_id),
              to_jsonb(k.parent_id), to_jsonb(k.policy), k.rate_limit, k.quota,
              to_jsonb(k.allowed_ips), to_jsonb(k.blocked_ips), to_jsonb(k.allowed_regions),
              to_jsonb(k.blocked_regions), to_jsonb(k.disable_at), to_jsonb(k.revoke_at),
              to_jsonb(k.notify_before::text), to_jsonb(k.enabled), to_jsonb(k.signing)]);
END $$;

CREATE OR REPLACE FUNCTION keypal.move_children(from_id uuid, to_id uuid)
RETURNS void LANGUAGE plpgsql VOLATILE SET enable_seqscan = off SET jit = off AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM keypal.keys c
                WHERE c.parent_id = from_id AND (c.revoked_at IS NULL OR c.revoked_at > now())) THEN
        UPDATE keypal.keys SET parent_id = to_id
         WHERE parent_id = from_id AND (revoked_at IS NULL OR revoked_at > now());
    END IF;
END $$;
REVOKE ALL ON FUNCTION keypal.move_children(uuid, uuid) FROM PUBLIC;

CREATE OR REPLACE FUNCTION keypal.check_children(key_id uuid, scopes text[], resources jsonb)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET enable_seqscan = off SET jit = off AS $$
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

CREATE OR REPLACE FUNCTION @extschema@.keypal_rotate(
    id uuid DEFAULT NULL, grace text DEFAULT NULL, name text DEFAULT NULL,
    description text DEFAULT NULL, scopes text[] DEFAULT NULL, resources jsonb DEFAULT NULL,
    tags text[] DEFAULT NULL, metadata jsonb DEFAULT NULL, expires_in text DEFAULT NULL,
    expires_at timestamptz DEFAULT NULL, rate_limit jsonb DEFAULT NULL, quota jsonb DEFAULT NULL,
    allowed_ips text[] DEFAULT NULL, blocked_ips text[] DEFAULT NULL,
    allowed_regions text[] DEFAULT NULL, blocked_regions text[] DEFAULT NULL,
    actor text DEFAULT NULL)
RETURNS SETOF keypal.rotated_key
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    old      keypal.keys := keypal.lock_key(id, 'rotated');
    who      text := keypal.actor(actor);
    v_grace  interval := coalesce(keypal.parse_duration(grace, 'grace', true), interval '0');
    over     jsonb := keypal.normalize_options(keypal.options(
        ARRAY['name', 'description', 'scopes', 'resources', 'tags', 'metadata', 'expires_in',
              'expires_at', 'rate_limit', 'quota', 'allowed_ips', 'blocked_ips', 'allowed_regions',
              'blocked_regions'],
        ARRAY[to_jsonb(name), to_jsonb(description), to_jsonb(scopes), resources, to_jsonb(tags),
              metadata, to_jsonb(expires_in), to_jsonb(expires_at), rate_limit, quota,
              to_jsonb(allowed_ips), to_jsonb(blocked_ips), to_jsonb(allowed_regions),
              to_jsonb(blocked_regions)]), '', false);
    opts     jsonb;
    made     keypal.created_key;
BEGIN
    IF old.rotated_to IS NOT NULL THEN
        RAISE EXCEPTION 'CANNOT_MODIFY_REVOKED: key % was already rotated to %', old.id, old.rotated_to
            USING ERRCODE = '55000', DETAIL = 'CANNOT_MODIFY_REVOKED';
    END IF;
    opts := keypal.settings_of(old) || jsonb_build_object('actor', who);
    -- The children move to the new key: it must still cover their scopes.
    PERFORM keypal.check_children(old.id, CASE WHEN over ? 'scopes' THEN keypal.text_array(over->'scopes')
                                               ELSE old.scopes END,
                                  coalesce(over->'resources', old.resources));
    IF NOT (over ? 'expires_in' OR over ? 'expires_at') THEN
        -- Keep the old expiry; an expired key's copy gets the old key's lifetime afresh.
        opts := opts || jsonb_build_object('expires_at', CASE
            WHEN old.expires_at IS NULL THEN NULL
            WHEN old.expires_at > now() THEN old.expires_at
            ELSE now() + (old.expires_at - old.created_at) END);
    END IF;
    made := keypal.create_key(opts || over, '',
        jsonb_build_object('rotated_from', old.id, 'context', jsonb_build_object('rotated_from', old.id)));
    PERFORM keypal.begin_change(who);
    -- Children follow the new key, so retiring the old one does not cascade to them.
    PERFORM keypal.move_children(old.id, made.id);
    UPDATE keypal.keys
       SET rotated_to = made.id, revoked_at = now() + v_grace, revoke_reason = 'rotated', revoked_by = who
     WHERE keys.id = old.id;
    PERFORM keypal.end_change();
    RETURN NEXT ROW(made.key, made.id, old.id, made.expires_at, made.env, made.signing_secret)::keypal.rotated_key;
END $$;

CREATE OR REPLACE FUNCTION keypal.cascades_to(child_revoked_at timestamptz, parent_revoked_at timestamptz)
RETURNS boolean LANGUAGE sql VOLATILE AS $$
    SELECT child_revoked_at IS NULL
        OR (child_revoked_at > parent_revoked_at AND child_revoked_at > clock_timestamp())
$$;
REVOKE ALL ON FUNCTION keypal.cascades_to(timestamptz, timestamptz) FROM PUBLIC;

CREATE OR REPLACE FUNCTION keypal.cascade_revocation()
RETURNS trigger LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET jit = off SET enable_nestloop = off
    SET enable_seqscan = off AS $$
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
    -- (the UPDATE sets this trigger off again: it ends where no key was newly revoked, or
    -- none of those has a child to revoke. An UPDATE of no rows would still set off the keys'
    -- statement triggers: most keys have no children. One probe of the parent_id index per
    -- parent, whatever the array's size: a lateral subquery is joined by a nested loop, and
    -- with sequential scans off, a LIMIT 1 never reads the table hoping for an early match
    -- when a few parents hold most children: a childless key's probe would read it all.)
    IF parents IS NOT NULL AND EXISTS (
        SELECT 1 FROM unnest(parents, moments) AS p(id, revoked_at),
               LATERAL (SELECT 1 FROM keypal.keys c
                         WHERE c.parent_id = p.id AND keypal.cascades_to(c.revoked_at, p.revoked_at)
                         LIMIT 1) child) THEN
        PERFORM keypal.revoke_children(parents, moments, revokers);
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION keypal.revoke_children(parents uuid[], moments timestamptz[], revokers text[])
RETURNS void LANGUAGE plpgsql VOLATILE SET enable_nestloop = on SET enable_hashjoin = off SET enable_mergejoin = off
    SET enable_seqscan = off SET enable_material = off SET jit = off AS $$
BEGIN
    UPDATE keypal.keys c
       SET revoked_at = p.revoked_at, revoke_reason = 'parent revoked', revoked_by = p.revoked_by
      FROM unnest(parents, moments, revokers) AS p(id, revoked_at, revoked_by)
     WHERE c.parent_id = p.id AND keypal.cascades_to(c.revoked_at, p.revoked_at);
END $$;

CREATE OR REPLACE FUNCTION keypal.set_timers(ids uuid[], kinds text[], dues timestamptz[])
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

CREATE OR REPLACE FUNCTION keypal.count_quota_use(key_id uuid, period text, n bigint)
RETURNS bigint LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
    total bigint;
BEGIN
    INSERT INTO keypal.quota_usage AS q (key_id, period_start, used)
    VALUES (count_quota_use.key_id, date_trunc(count_quota_use.period, now(), 'UTC'), count_quota_use.n)
    ON CONFLICT (key_id) DO UPDATE
        -- Periods only move forward (as in the flush worker's writes): a transaction begun
        -- before a period's turn counts in the newer period the row already holds.
        SET used = CASE WHEN q.period_start >= EXCLUDED.period_start THEN q.used ELSE 0 END + EXCLUDED.used,
            period_start = greatest(q.period_start, EXCLUDED.period_start)
    RETURNING q.used INTO total;
    RETURN total;
END $$;

CREATE OR REPLACE FUNCTION keypal.emit_event(event text, key_id uuid, data jsonb)
RETURNS bigint LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN keypal.emit_events(ARRAY[event], ARRAY[key_id], ARRAY[data]);
END $$;
