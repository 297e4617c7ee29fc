-- keypal 0.5.0 -> 0.6.0 (ALTER EXTENSION keypal UPDATE).
-- Creating one key costs about a third of what it did: keypal_create is Rust (the same
-- arguments, defaults, result and privileges); keypal.create_keys writes its keys' audit
-- rows, events and timers itself, so the INSERT trigger runs only for other INSERTs into
-- keypal.keys (keypal_import, a restore); keypal.emit_events is Rust. New keys' ids are
-- version 7 uuids (time-ordered: their index entries land on the same few pages).

CREATE FUNCTION keypal."audit_written"() RETURNS bool
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'audit_written_wrapper';
REVOKE ALL ON FUNCTION keypal.audit_written() FROM PUBLIC;

CREATE OR REPLACE FUNCTION keypal."emit_events"(
	"events" TEXT[],
	"key_ids" uuid[],
	"data" jsonb[]
) RETURNS bigint
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'emit_events_wrapper';

CREATE OR REPLACE FUNCTION @extschema@.keypal_create(
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
LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'keypal_create_c_wrapper';

-- The INSERT trigger (now for keypal_import and other INSERTs) builds timers only for keys
-- with a moment (most imported keys have none).
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
                  FROM keypal_new n CROSS JOIN unnest(ARRAY['disable', 'revoke', 'expiring', 'expired']) AS w(kind)
                 -- (only keys with a moment: most have none, and each row built costs)
                 WHERE n.disable_at IS NOT NULL OR n.revoke_at IS NOT NULL OR n.expires_at IS NOT NULL) a
         WHERE a.due IS NOT NULL
            ON CONFLICT (key_id, kind) DO UPDATE SET due_at = EXCLUDED.due_at
        RETURNING 1)
    SELECT count(*) INTO armed FROM set;
    PERFORM keypal.timers_armed(armed);
    RETURN NULL;
END $$;

DROP TRIGGER keys_audit ON keypal.keys;
CREATE TRIGGER keys_audit AFTER INSERT ON keypal.keys REFERENCING NEW TABLE AS keypal_new
    FOR EACH STATEMENT WHEN (NOT keypal.audit_written())
    EXECUTE FUNCTION keypal.audit_inserted_keys();

-- keypal.keys' four CHECK expressions become one function call (PostgreSQL parsed and
-- planned the four again for every statement writing keys). Adding it checks every row
-- once (a scan of keypal.keys under its ACCESS EXCLUSIVE lock: seconds per million keys).
CREATE FUNCTION keypal.key_row_ok(algorithm text, id uuid, parent_id uuid, resources jsonb, metadata jsonb)
RETURNS boolean LANGUAGE c IMMUTABLE PARALLEL SAFE AS 'MODULE_PATHNAME', 'keypal_key_row_ok';
COMMENT ON FUNCTION keypal.key_row_ok(text, uuid, uuid, jsonb, jsonb) IS
    'The CHECK of keypal.keys: algorithm sha256 or sha512, parent_id not the key itself, resources and metadata JSON objects.';
REVOKE ALL ON FUNCTION keypal.key_row_ok(text, uuid, uuid, jsonb, jsonb) FROM PUBLIC;
ALTER TABLE keypal.keys
    DROP CONSTRAINT keys_algorithm_check,
    DROP CONSTRAINT keys_check,
    DROP CONSTRAINT keys_resources_check,
    DROP CONSTRAINT keys_metadata_check,
    ADD CONSTRAINT keys_row_check CHECK (keypal.key_row_ok(algorithm, id, parent_id, resources, metadata));
