-- keypal 0.7.0 -> 0.8.0 (ALTER EXTENSION keypal UPDATE).
-- Audit and concurrency fixes; nothing in any public function's arguments, results or
-- privileges changes.
-- - A direct UPDATE of keypal.keys that changes last_used_at along with other columns is
--   audited (it was skipped whole), and a new key_hash is audited as {"key_hash": "changed"}
--   (keypal.key_changes, keypal.audit_updated_keys).
-- - updated_at moves with every change the audit log records, an UPDATE that also writes
--   last_used_at included (keypal.touch_updated_at; the trigger loses its WHEN clause, replaced in place).
-- - notify_before is compared as text: '1 mon' and '30 days' are equal intervals but not
--   the same moment before most expiries, so changing one for the other is audited and
--   moves the key.expiring timer (keypal.key_changes, keypal.arm_timers).
-- - REPEATABLE READ and SERIALIZABLE: revoking, rotating or narrowing the scopes of a key
--   that gained a child after the transaction's snapshot (made while this one waited for
--   the key's lock) fails with 40001 instead of missing the child
--   (keypal.refuse_unseen_children, new; keypal.check_children,
--   keypal.cascade_revocation); so does an import overwriting such a key (keypal_import).
-- - A COPY into keypal.keys skips the audit trigger as a restore only for the table's owner
--   or a superuser (keypal.restoring); another role's COPY (possible only with EXECUTE on
--   keypal's internal functions granted) is audited like any INSERT.

CREATE FUNCTION keypal."refuse_unseen_children"(
	"parents" uuid[] /* pgrx::datum::array::Array<pgrx::datum::uuid::Uuid> */
) RETURNS void
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'refuse_unseen_children_wrapper';
REVOKE ALL ON FUNCTION keypal.refuse_unseen_children(uuid[]) FROM PUBLIC;


CREATE OR REPLACE FUNCTION keypal.key_changes(o keypal.keys, n keypal.keys)
RETURNS jsonb LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN '{}'::jsonb
        || CASE WHEN o.id IS DISTINCT FROM n.id THEN jsonb_build_object('id', jsonb_build_object('old', o.id, 'new', n.id)) ELSE '{}' END
        -- (the hash itself is never written down: only that it changed)
        || CASE WHEN o.key_hash IS DISTINCT FROM n.key_hash THEN jsonb_build_object('key_hash', 'changed') ELSE '{}' END
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
        -- (as text: '1 mon' = '30 days' for an interval, yet they differ from most expiries)
        || CASE WHEN o.notify_before::text IS DISTINCT FROM n.notify_before::text THEN jsonb_build_object('notify_before', jsonb_build_object('old', o.notify_before, 'new', n.notify_before)) ELSE '{}' END
        || CASE WHEN o.signing IS DISTINCT FROM n.signing THEN jsonb_build_object('signing', jsonb_build_object('old', o.signing, 'new', n.signing)) ELSE '{}' END;
END $$;

CREATE OR REPLACE FUNCTION keypal.audit_updated_keys()
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
          -- (a write of last_used_at alone, an import's, changes nothing key_changes sees:
          -- no row; one that changes other columns too is audited for those)
          FROM (SELECT x.r, x.old_r, keypal.key_changes(x.old_r, x.r) AS changes
                  FROM (SELECT ROW(n.*)::keypal.keys AS r, ROW(o.*)::keypal.keys AS old_r
                          FROM keypal_new n JOIN keypal_old o USING (id)) x) c
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

CREATE OR REPLACE FUNCTION keypal.check_children(key_id uuid, scopes text[], resources jsonb)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET enable_seqscan = off SET jit = off AS $$
DECLARE
    child uuid;
BEGIN
    PERFORM keypal.refuse_unseen_children(ARRAY[check_children.key_id]);
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
    -- (REPEATABLE READ: a child this statement's snapshot does not show would be missed)
    IF parents IS NOT NULL THEN
        PERFORM keypal.refuse_unseen_children(parents);
    END IF;
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

CREATE OR REPLACE FUNCTION keypal.restoring(relid oid)
RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    RETURN coalesce(current_setting('keypal._actor', true), '') = '' AND keypal.copying_into(relid)
       AND pg_has_role(current_user, (SELECT c.relowner FROM pg_class c WHERE c.oid = relid), 'USAGE');
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
    -- (keypal.import_row, src/import_row.rs, makes each record's row)
    CREATE TEMP TABLE "keypal import" ON COMMIT DROP AS
    SELECT (e.n - 1)::integer AS n, 'i'::"char" AS act, x.source, (x.k).*,
           CASE WHEN x.notify IS NOT NULL
                THEN keypal.parse_duration(x.notify, format('data[%s].notify_before', e.n - 1)) END AS notify,
           CASE WHEN x.source = 'keypal' AND jsonb_typeof(e.v->'metadata') = 'object' THEN e.v->'metadata'
                ELSE (x.k).metadata END AS meta,
           x.limits
      FROM jsonb_array_elements(data) WITH ORDINALITY AS e(v, n)
     CROSS JOIN LATERAL keypal.import_row(e.v::text, (e.n - 1)::integer) AS x;
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
    -- (REPEATABLE READ: a child made meanwhile under a key to overwrite, which step 3 checks
    -- against the new scopes, would be missed)
    PERFORM keypal.refuse_unseen_children(ARRAY(SELECT t.id FROM pg_temp."keypal import" t WHERE t.act = 'o'));
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

CREATE OR REPLACE FUNCTION keypal.touch_updated_at()
RETURNS trigger LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NEW.last_used_at IS DISTINCT FROM OLD.last_used_at AND keypal.key_changes(OLD, NEW) = '{}' THEN
        RETURN NEW;
    END IF;
    NEW.updated_at := now();
    RETURN NEW;
END $$;
-- (OR REPLACE: a SHARE ROW EXCLUSIVE lock, which verify's reads do not wait for, where
-- DROP TRIGGER's ACCESS EXCLUSIVE would queue them behind any open transaction on keys)
CREATE OR REPLACE TRIGGER keys_updated_at BEFORE UPDATE ON keypal.keys
    FOR EACH ROW EXECUTE FUNCTION keypal.touch_updated_at();
