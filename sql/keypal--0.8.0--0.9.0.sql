-- keypal 0.8.0 -> 0.9.0 (ALTER EXTENSION keypal UPDATE).
-- Nothing in any public function's arguments, results or privileges changes, nor in what
-- the audit log and the outbox record of keypal's own changes.
-- - keypal.audit_updated_keys works out each changed key's diff (keypal.key_changes) once,
--   not twice: the planner had pulled the subquery that makes it up into its caller and
--   called it again for the filter that drops unchanged rows (for an UPDATE of 100 000
--   keys, 1.0-1.2 s in key_changes on 0.8.0, 0.6 s now).
-- - An UPDATE of a key's id fails (0A000, keypal.touch_updated_at): the audit trigger pairs
--   old and new rows by id, so such an UPDATE (possible only for the table's owner) went
--   unaudited.

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
          -- (OFFSET 0: key_changes once per row; pulled up, the subquery's call was made
          -- twice, once for the WHERE below and once for the row)
          FROM (SELECT x.r, x.old_r, keypal.key_changes(x.old_r, x.r) AS changes
                  FROM (SELECT ROW(n.*)::keypal.keys AS r, ROW(o.*)::keypal.keys AS old_r
                          FROM keypal_new n JOIN keypal_old o USING (id)) x OFFSET 0) c
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

CREATE OR REPLACE FUNCTION keypal.touch_updated_at()
RETURNS trigger LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NEW.id IS DISTINCT FROM OLD.id THEN
        RAISE EXCEPTION 'a key''s id cannot change (key %)', OLD.id
            USING ERRCODE = '0A000', HINT = 'the audit log names keys by id; create a new key instead';
    END IF;
    IF NEW.last_used_at IS DISTINCT FROM OLD.last_used_at AND keypal.key_changes(OLD, NEW) = '{}' THEN
        RETURN NEW;
    END IF;
    NEW.updated_at := now();
    RETURN NEW;
END $$;
