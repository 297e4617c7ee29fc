-- keypal 0.5.0 -> 0.6.0 (ALTER EXTENSION keypal UPDATE).
-- Creating one key costs about a third of what it did: keypal_create is Rust (the same
-- arguments, defaults, result and privileges); keypal.create_keys writes its keys' audit
-- rows, events and timers itself, so the INSERT trigger runs only for other INSERTs into
-- keypal.keys (keypal_import, a restore); keypal.emit_events is Rust.

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

DROP TRIGGER keys_audit ON keypal.keys;
CREATE TRIGGER keys_audit AFTER INSERT ON keypal.keys REFERENCING NEW TABLE AS keypal_new
    FOR EACH STATEMENT WHEN (NOT keypal.audit_written())
    EXECUTE FUNCTION keypal.audit_inserted_keys();
