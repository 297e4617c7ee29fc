-- keypal: management functions, triggers, comments and privileges.
-- Loaded last (finalize), after the Rust functions it builds on.
-- Every SECURITY DEFINER function pins search_path and schema-qualifies every object.

--------------------------------------------------------------------------------
-- Internal helpers (schema keypal, not executable by PUBLIC)
--------------------------------------------------------------------------------

CREATE TYPE keypal.created_key AS (
    key            text,
    id             uuid,
    expires_at     timestamptz,
    env            text,
    signing_secret text
);
COMMENT ON TYPE keypal.created_key IS
    'What the create functions return: the plaintext key (shown once, never stored) and its id.';

CREATE TYPE keypal.rotated_key AS (
    key        text,
    id         uuid,
    old_id     uuid,
    expires_at timestamptz,
    env        text,
    signing_secret text
);
COMMENT ON TYPE keypal.rotated_key IS 'What keypal_rotate returns: the new plaintext key (once), its id, and the old id.';

-- The public columns of a key: everything but its hash.
CREATE VIEW keypal.key_info AS
SELECT k.id, k.owner_id, k.org_id, k.env, k.name, k.description, k.scopes, k.resources, k.tags,
       k.metadata, k.enabled, k.created_at, k.updated_at, k.expires_at,
       -- the exact value: the worker's last write, or a use verify recorded since
       greatest(k.last_used_at, u.last_used_at, keypal.unwritten_last_use(k.id)) AS last_used_at,
       k.revoked_at, k.revoke_reason, k.revoked_by, k.rotated_from, k.rotated_to, k.parent_id,
       k.policy, k.rate_limit, k.quota, k.allowed_ips, k.blocked_ips, k.allowed_regions,
       k.blocked_regions, k.disable_at, k.revoke_at, k.notify_before, k.algorithm
  FROM keypal.keys k LEFT JOIN keypal.key_usage u ON u.key_id = k.id;
COMMENT ON VIEW keypal.key_info IS 'The public columns of keypal.keys (never the hash), last_used_at as of now.';

-- All per-hour usage: keypal.usage and what verify counted that the flush worker has not
-- yet written there. A key, hour and endpoint may appear more than once: sum them.
CREATE VIEW keypal.hourly_usage AS
SELECT u.key_id, u.hour, u.endpoint, u.requests, u.tokens, u.cost FROM keypal.usage u
UNION ALL
SELECT q.key_id, q.hour, '', q.hour_requests, 0, 0::numeric FROM keypal.quota_usage q
 WHERE q.hour IS NOT NULL AND q.hour_requests > 0
UNION ALL
SELECT w.key_id, w.hour, '', w.requests, 0, 0::numeric FROM keypal.unwritten_usage() w;
COMMENT ON VIEW keypal.hourly_usage IS 'Requests, tokens and cost per key, hour and endpoint, as of now (sum rows of the same key, hour and endpoint).';

-- The functions that write keys in bulk (the keys' statement triggers, keypal_import) run with jit = off: their plans' estimates over transition
-- tables and arrays are large, and compiling their expressions with LLVM took longer than
-- running them (most of a 20 000-key statement). The triggers that join a statement's old
-- and new rows do so with nested loops off: a transition table's size is fixed into the
-- query when PL/pgSQL first parses it, so a plan made for a one-row statement would join a
-- later 100 000-row one by nested loop (tests/sql/16_bulk.sql runs one after the other).
-- The Rust writers (create_keys' INSERT, its audit rows, emit_events) run one generic plan
-- each, never planned again per call, never compiled by JIT (src/spi.rs Stmt::generic).
-- Internal helpers (keypal.*, no EXECUTE for PUBLIC) run only inside keypal's own entry
-- points — SECURITY DEFINER functions, trigger functions, the worker, Rust's catalog load —
-- which all pin search_path = pg_catalog, pg_temp. They do not set it again: a function with
-- a SET clause is never inlined and pays a configuration save and restore on every call,
-- which was most of what creating a key cost. What runs once per change and cannot be
-- inlined (a VOLATILE or SECURITY DEFINER function, one returning a row) is PL/pgSQL, not
-- SQL: PostgreSQL 15 parses and plans a SQL function's body again on every call, where
-- PL/pgSQL keeps its plans for the session (keypal_create was a fifth cheaper so).
CREATE FUNCTION keypal.parse_duration(value text, arg text, allow_zero boolean DEFAULT false)
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

CREATE FUNCTION keypal.parse_timestamp(value text, arg text)
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

CREATE FUNCTION keypal.text_array(j jsonb)
RETURNS text[] LANGUAGE sql IMMUTABLE AS $$
    SELECT coalesce(array_agg(x ORDER BY n), '{}')
      FROM jsonb_array_elements_text(CASE WHEN jsonb_typeof(j) = 'array' THEN j ELSE '[]' END)
           WITH ORDINALITY AS t(x, n)
$$;

-- Builds an options object from argument names and values, leaving out SQL NULLs (an
-- argument not given) but keeping JSON null (a setting to clear).
CREATE FUNCTION keypal.options(names text[], vals jsonb[])
RETURNS jsonb LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    RETURN (SELECT coalesce(jsonb_object_agg(t.n, t.v), '{}')
              FROM unnest(names, vals) AS t(n, v)
             WHERE t.v IS NOT NULL);
END $$;

-- Who is acting: the function's actor argument, else keypal.actor, else the caller's role.
CREATE FUNCTION keypal.actor(given text)
RETURNS text LANGUAGE sql STABLE AS $$
    SELECT coalesce(nullif(given, ''), nullif(current_setting('keypal.actor', true), ''),
                    keypal.invoking_user())
$$;

-- The audit trigger reads who acts, and why, from these transaction-local settings; the
-- management functions set them around each write and clear them after. keypal._depth: the
-- trigger depth the function runs at (called from a trigger of the caller's, it is not 0),
-- so that the audit trigger tells its own writes (one level down) from the cascades they set
-- off (further down).
CREATE FUNCTION keypal.begin_change(actor text, action text DEFAULT NULL, context jsonb DEFAULT NULL)
RETURNS void LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM set_config('keypal._actor', coalesce(actor, ''), true),
            set_config('keypal._action', coalesce(action, ''), true),
            set_config('keypal._context', coalesce(context::text, ''), true),
            set_config('keypal._depth', pg_trigger_depth()::text, true);
END $$;

CREATE FUNCTION keypal.end_change()
RETURNS void LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM keypal.begin_change(NULL);
END $$;

CREATE FUNCTION keypal.key_not_found(id uuid, what text DEFAULT 'id')
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF id IS NULL THEN
        RAISE EXCEPTION 'invalid %: is required', what USING ERRCODE = '22023',
            HINT = 'pass the key''s id (keypal_create and keypal_verify return it as id / key_id)';
    END IF;
    RAISE EXCEPTION 'KEY_NOT_FOUND: no API key with % %', what, coalesce(id::text, 'NULL')
        USING ERRCODE = 'P0002', DETAIL = 'KEY_NOT_FOUND';
END $$;

-- The key with this id, or KEY_NOT_FOUND (P0002).
CREATE FUNCTION keypal.find_key(key_id uuid)
RETURNS keypal.keys LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    k keypal.keys;
BEGIN
    SELECT * INTO k FROM keypal.keys WHERE id = key_id;
    IF NOT FOUND THEN
        PERFORM keypal.key_not_found(key_id, 'id');
    END IF;
    RETURN k;
END $$;

-- Adds n requests to a key's quota use in the current period (starting afresh when the
-- period has turned) and returns the use (keypal_track_usage). PL/pgSQL: planned once per
-- session (as SQL, with its SET clause, it was planned at every call: a third of tracking a
-- request for a key with a quota).
CREATE FUNCTION keypal.count_quota_use(key_id uuid, period text, n bigint)
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

-- Whether a key is revoked now, as verify judges it: revoked, or past its revoke_at (at the
-- current time, not the transaction's start). One definition for every check that must agree
-- with verify (inlined: a one-expression SQL function).
CREATE FUNCTION keypal.revoked_now(revoked_at timestamptz, revoke_at timestamptz)
RETURNS boolean LANGUAGE sql VOLATILE AS $$
    SELECT coalesce(revoked_at <= clock_timestamp() OR revoke_at <= clock_timestamp(), false)
$$;

-- Whether revoking a parent at parent_revoked_at cascades to a child revoked at
-- child_revoked_at: one not revoked, or only scheduled to be (a rotation's grace), later than
-- its parent. A child revoked already is left as it is: it was revoked once, and is not
-- again. One definition for the cascade's probe for a child and its UPDATE
-- (keypal.cascade_revocation, keypal.revoke_children), which must agree (inlined: a
-- one-expression SQL function).
CREATE FUNCTION keypal.cascades_to(child_revoked_at timestamptz, parent_revoked_at timestamptz)
RETURNS boolean LANGUAGE sql VOLATILE AS $$
    SELECT child_revoked_at IS NULL
        OR (child_revoked_at > parent_revoked_at AND child_revoked_at > clock_timestamp())
$$;

-- Locks a key for a change; raises KEY_NOT_FOUND (P0002) or CANNOT_MODIFY_REVOKED (55000).
CREATE FUNCTION keypal.lock_key(key_id uuid, action text)
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

-- Checks a key's settings against its policy (create and update); each violation raises
-- 22023 naming the rule.
CREATE FUNCTION keypal.enforce_policy(policy_name text, scopes text[], resources jsonb,
                                      expires_at timestamptz, allowed_ips text[], arg_prefix text)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    p keypal.policies;
BEGIN
    SELECT * INTO p FROM keypal.policies WHERE name = policy_name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'invalid %policy: no policy named %', arg_prefix, quote_literal(policy_name)
            USING ERRCODE = '22023';
    END IF;
    IF p.scopes IS NOT NULL
       AND NOT keypal.scopes_within(scopes, resources, p.scopes, coalesce(p.resources, '{}')) THEN
        RAISE EXCEPTION 'key violates policy %: rule scopes allows only % (and resources %)',
            quote_literal(p.name), p.scopes, coalesce(p.resources, '{}') USING ERRCODE = '22023';
    END IF;
    IF p.max_ttl IS NOT NULL AND (expires_at IS NULL OR expires_at > now() + p.max_ttl) THEN
        RAISE EXCEPTION 'key violates policy %: rule max_ttl requires an expiry within %',
            quote_literal(p.name), p.max_ttl USING ERRCODE = '22023';
    END IF;
    IF p.require_ip AND cardinality(allowed_ips) = 0 THEN
        RAISE EXCEPTION 'key violates policy %: rule require_ip requires allowed_ips', quote_literal(p.name)
            USING ERRCODE = '22023';
    END IF;
    IF p.max_resources IS NOT NULL
       AND (SELECT count(*) FROM jsonb_object_keys(resources)) > p.max_resources THEN
        RAISE EXCEPTION 'key violates policy %: rule max_resources allows at most % resources',
            quote_literal(p.name), p.max_resources USING ERRCODE = '22023';
    END IF;
END $$;

-- The level of a key in its hierarchy (a root key is 1); counting stops past the cap.
CREATE FUNCTION keypal.depth_of(key_id uuid)
RETURNS integer LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (WITH RECURSIVE up(id, depth) AS (
                SELECT k.parent_id, 1 FROM keypal.keys k WHERE k.id = depth_of.key_id
                UNION ALL
                SELECT k.parent_id, up.depth + 1 FROM keypal.keys k JOIN up ON k.id = up.id
                 WHERE up.depth <= keypal.max_hierarchy_depth())
            SELECT max(up.depth) FROM up);
END $$;

-- How many levels of descendants a key has (0: none), counting no further than the cap: a
-- key moved under another parent (keypal_import's overwrite) takes them along.
CREATE FUNCTION keypal.height_below(key_id uuid)
RETURNS integer LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (WITH RECURSIVE down(id, height) AS (
                SELECT height_below.key_id, 0
                UNION ALL
                SELECT c.id, down.height + 1 FROM keypal.keys c JOIN down ON c.parent_id = down.id
                 WHERE down.height <= keypal.max_hierarchy_depth())
            SELECT max(down.height) FROM down);
END $$;

-- Refuses new scopes/resources for a key that its live children would exceed. (Its probe
-- reads the parent_id index, never the table, as keypal.move_children's: sequential scans
-- off, and JIT with them.)
CREATE FUNCTION keypal.check_children(key_id uuid, scopes text[], resources jsonb)
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

-- Checks a would-be child against its parent (locked FOR SHARE, so a concurrent revoke,
-- rotation or update of the parent waits for this transaction, and then, in READ
-- COMMITTED, sees the child; in REPEATABLE READ or SERIALIZABLE, whose snapshot does not
-- show it, fails with 40001: keypal.refuse_unseen_children).
-- Returns the child's expiry: its own, or the parent's when it has none.
CREATE FUNCTION keypal.check_parent(parent uuid, scopes text[], resources jsonb,
                                    expires_at timestamptz, arg_prefix text)
RETURNS timestamptz LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    p keypal.keys;
    state text;
BEGIN
    SELECT * INTO p FROM keypal.keys WHERE id = parent FOR SHARE;
    IF NOT FOUND THEN
        PERFORM keypal.key_not_found(parent, 'parent_id');
    END IF;
    -- The parent must verify by its state (its own and its ancestors', as verify judges it).
    state := keypal.key_state(parent);
    IF state = 'REVOKED' THEN
        RAISE EXCEPTION 'CANNOT_MODIFY_REVOKED: parent key % is revoked', parent
            USING ERRCODE = '55000', DETAIL = 'CANNOT_MODIFY_REVOKED';
    ELSIF state IS NOT NULL THEN
        RAISE EXCEPTION 'invalid %parent_id: parent key % is disabled or expired', arg_prefix, parent
            USING ERRCODE = '55000', DETAIL = state;
    END IF;
    IF NOT keypal.scopes_within(scopes, resources, p.scopes, p.resources) THEN
        RAISE EXCEPTION 'invalid %scopes: a child key''s scopes % must be a subset of its parent''s %',
            arg_prefix, scopes, p.scopes USING ERRCODE = '22023';
    END IF;
    IF p.expires_at IS NOT NULL AND expires_at > p.expires_at THEN
        RAISE EXCEPTION 'invalid %expires_at: a child key cannot outlive its parent (which expires at %)',
            arg_prefix, p.expires_at USING ERRCODE = '22023';
    END IF;
    RETURN coalesce(expires_at, p.expires_at);
END $$;

-- Refuses an environment that is not one of envs (the configured environments) with 22023
-- naming arg; NULL, or no environments configured, passes.
CREATE FUNCTION keypal.check_env(env text, arg text, envs jsonb)
RETURNS boolean LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF env IS NOT NULL AND jsonb_typeof(envs) = 'object' AND NOT envs ? env THEN
        RAISE EXCEPTION 'invalid %: no environment named % (configured: %)', arg, quote_literal(env),
            (SELECT string_agg(e, ', ') FROM jsonb_object_keys(envs) e) USING ERRCODE = '22023';
    END IF;
    RETURN true;
END $$;

-- A new key's expiry, checked: from expires_in or expires_at, a policy's max_ttl when it has
-- none, capped by a parent's; then the parent and policy rules. Called by create_keys only for
-- a key with a parent, a policy or an expiry not in the future (the rest need no lookup).
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

-- The one CHECK of keypal.keys (src/create.rs keypal_key_row_ok: one function call, where
-- four CHECK expressions were parsed and planned again for every statement writing keys).
CREATE FUNCTION keypal.key_row_ok(algorithm text, id uuid, parent_id uuid, resources jsonb, metadata jsonb)
RETURNS boolean LANGUAGE c IMMUTABLE PARALLEL SAFE AS 'MODULE_PATHNAME', 'keypal_key_row_ok';
COMMENT ON FUNCTION keypal.key_row_ok(text, uuid, uuid, jsonb, jsonb) IS
    'The CHECK of keypal.keys: algorithm sha256 or sha512, parent_id not the key itself, resources and metadata JSON objects.';
ALTER TABLE keypal.keys ADD CONSTRAINT keys_row_check
    CHECK (keypal.key_row_ok(algorithm, id, parent_id, resources, metadata));

-- keypal.create_keys(specs jsonb[], prefixes text[], extra jsonb), the one place keys are
-- made, is Rust (src/create.rs): it checks each spec, generates and hashes its key, and
-- writes the rows by one INSERT, then their audit rows, events and timers (src/audit.rs).

CREATE FUNCTION keypal.create_key(opts jsonb, arg_prefix text DEFAULT '', extra jsonb DEFAULT '{}')
RETURNS keypal.created_key LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    made keypal.created_key;
BEGIN
    SELECT * INTO made FROM keypal.create_keys(ARRAY[opts], ARRAY[arg_prefix], extra);
    RETURN made;
END $$;

--------------------------------------------------------------------------------
-- Create
--------------------------------------------------------------------------------

-- Rust (src/create.rs keypal_create_c_wrapper): the arguments given become the key's options.
CREATE FUNCTION keypal_create(
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

CREATE FUNCTION keypal_create_read_only(
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

CREATE FUNCTION keypal_create_full_access(
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

CREATE FUNCTION keypal_create_many(specs jsonb DEFAULT NULL)
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
CREATE FUNCTION keypal_define_template(name text DEFAULT NULL, options jsonb DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    o jsonb;
BEGIN
    IF coalesce(trim(name), '') = '' THEN
        RAISE EXCEPTION 'invalid name: a template needs a name' USING ERRCODE = '22023';
    END IF;
    o := keypal.normalize_options(coalesce(options, '{}'), 'options.', false);
    -- What keypal_create would refuse, refused now rather than when the template is used.
    PERFORM keypal.parse_duration(o->>'expires_in', 'options.expires_in'),
            keypal.parse_duration(o->>'notify_before', 'options.notify_before'),
            keypal.parse_timestamp(o->>'expires_at', 'options.expires_at'),
            keypal.parse_timestamp(o->>'disable_at', 'options.disable_at'),
            keypal.parse_timestamp(o->>'revoke_at', 'options.revoke_at');
    PERFORM keypal.check_env(o->>'env', 'options.env', (keypal.config()).environments);
    IF o ? 'policy' AND NOT EXISTS (SELECT 1 FROM keypal.policies p WHERE p.name = o->>'policy') THEN
        RAISE EXCEPTION 'invalid options.policy: no policy named %', quote_literal(o->>'policy')
            USING ERRCODE = '22023';
    END IF;
    INSERT INTO keypal.templates AS t (name, options) VALUES (name, o)
        ON CONFLICT ON CONSTRAINT templates_pkey DO UPDATE SET options = EXCLUDED.options;
    RETURN o;
END $$;

CREATE FUNCTION keypal_create_from_template(template text DEFAULT NULL, owner_id text DEFAULT NULL,
                                            name text DEFAULT NULL, overrides jsonb DEFAULT NULL)
RETURNS SETOF keypal.created_key
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t keypal.templates;
BEGIN
    SELECT * INTO t FROM keypal.templates WHERE templates.name = template;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'invalid template: no template named %', quote_literal(coalesce(template, 'NULL'))
            USING ERRCODE = '22023';
    END IF;
    RETURN QUERY SELECT * FROM keypal.create_key(
        t.options
        || keypal.normalize_options(coalesce(overrides, '{}'), 'overrides.', false)
        || keypal.options(ARRAY['owner_id', 'name'], ARRAY[to_jsonb(owner_id), to_jsonb(name)]),
        '', jsonb_build_object('context', jsonb_build_object('template', template)));
END $$;

CREATE FUNCTION keypal_define_policy(name text DEFAULT NULL, scopes text[] DEFAULT NULL,
                                     resources jsonb DEFAULT NULL, rate_limit jsonb DEFAULT NULL,
                                     max_ttl text DEFAULT NULL, require_ip boolean DEFAULT false,
                                     max_resources integer DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    o jsonb;
    p keypal.policies;
BEGIN
    IF coalesce(trim(name), '') = '' THEN
        RAISE EXCEPTION 'invalid name: a policy needs a name' USING ERRCODE = '22023';
    END IF;
    IF max_resources IS NOT NULL AND max_resources < 0 THEN
        RAISE EXCEPTION 'invalid max_resources: must not be negative' USING ERRCODE = '22023';
    END IF;
    o := keypal.normalize_options(keypal.options(ARRAY['scopes', 'resources', 'rate_limit'],
                                  ARRAY[to_jsonb(scopes), resources, rate_limit]), '', false);
    INSERT INTO keypal.policies AS t (name, scopes, resources, rate_limit, max_ttl, require_ip, max_resources)
    VALUES (name, CASE WHEN o ? 'scopes' THEN keypal.text_array(o->'scopes') END, o->'resources',
            nullif(o->'rate_limit', 'null'), keypal.parse_duration(max_ttl, 'max_ttl'),
            coalesce(require_ip, false), max_resources)
    ON CONFLICT ON CONSTRAINT policies_pkey DO UPDATE
        SET scopes = EXCLUDED.scopes, resources = EXCLUDED.resources, rate_limit = EXCLUDED.rate_limit,
            max_ttl = EXCLUDED.max_ttl, require_ip = EXCLUDED.require_ip,
            max_resources = EXCLUDED.max_resources
    RETURNING * INTO p;
    RETURN to_jsonb(p);
END $$;

--------------------------------------------------------------------------------
-- Verify family (the single-key functions are Rust; these build on them)
--------------------------------------------------------------------------------

CREATE FUNCTION keypal_verify_many(keys text[] DEFAULT NULL, scope text DEFAULT NULL,
                                   scopes text[] DEFAULT NULL, resource text DEFAULT NULL,
                                   ip inet DEFAULT NULL, country text DEFAULT NULL,
                                   env text DEFAULT NULL, cost integer DEFAULT NULL)
RETURNS SETOF keypal.verify_result
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF cardinality(keys) > 1000 THEN
        RAISE EXCEPTION 'invalid keys: at most 1000 keys per call, got %', cardinality(keys)
            USING ERRCODE = '22023';
    END IF;
    RETURN QUERY
        SELECT v.*
          FROM unnest(keys) WITH ORDINALITY AS u(k, n)
         CROSS JOIN LATERAL @extschema@.keypal_verify(u.k, scope, scopes, resource, ip, country, env, cost) AS v
         ORDER BY u.n;
END $$;

-- Who may ask about a key by id: the holder of that key (authenticated in this
-- transaction), or a role allowed to read keys (EXECUTE on keypal_get).
CREATE FUNCTION keypal.may_inspect(key_id uuid)
RETURNS boolean LANGUAGE sql STABLE PARALLEL RESTRICTED SET search_path = pg_catalog, pg_temp AS $$
    SELECT key_id = keypal.authenticated_key_id()
        OR has_function_privilege(keypal.invoking_user(), '@extschema@.keypal_get(uuid)', 'EXECUTE')
$$;

CREATE FUNCTION keypal_has_scope(key_id uuid DEFAULT NULL, scope text DEFAULT NULL, resource text DEFAULT NULL)
RETURNS boolean
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN coalesce(keypal.may_inspect($1), false)
                THEN keypal.key_holds($1, ARRAY[$2], $3, true) ELSE false END
$$;

CREATE FUNCTION keypal_has_any_scope(key_id uuid DEFAULT NULL, scopes text[] DEFAULT NULL, resource text DEFAULT NULL)
RETURNS boolean
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN coalesce(keypal.may_inspect($1), false)
                THEN keypal.key_holds($1, $2, $3, false) ELSE false END
$$;

CREATE FUNCTION keypal_has_all_scopes(key_id uuid DEFAULT NULL, scopes text[] DEFAULT NULL, resource text DEFAULT NULL)
RETURNS boolean
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN coalesce(keypal.may_inspect($1), false)
                THEN keypal.key_holds($1, $2, $3, true) ELSE false END
$$;

-- Request signing (SPEC §3): true only when the signature signs this request with the
-- key's signing secret, is dated within max_age (at most a minute ahead), was not seen
-- before within max_age, and the key is a signing key that would verify now. Any role may
-- call it; every failure is the same false.
CREATE FUNCTION keypal_verify_signature(key_id uuid DEFAULT NULL, method text DEFAULT NULL, path text DEFAULT NULL,
                                        body text DEFAULT NULL, signature text DEFAULT NULL,
                                        max_age text DEFAULT '5m')
RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    age interval := keypal.parse_duration(coalesce(max_age, '5m'), 'max_age');
BEGIN
    -- Bounded: every signature accepted is remembered for max_age.
    IF age > interval '1 hour' THEN
        RAISE EXCEPTION 'invalid max_age: at most 1 hour, got %', max_age USING ERRCODE = '22023';
    END IF;
    IF key_id IS NULL OR method IS NULL OR path IS NULL OR signature IS NULL THEN
        RETURN false;
    END IF;
    -- No server secret here (a standby whose postgresql.auto.conf lacks it, say): the same
    -- false as every failure, and a warning for the DBA.
    IF coalesce(current_setting('keypal.signing_secret', true), '') = '' THEN
        RAISE WARNING 'keypal: keypal.signing_secret is not set on this server: no signature verifies';
        RETURN false;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM keypal.keys k WHERE k.id = keypal_verify_signature.key_id AND k.signing)
       OR keypal.key_state(key_id) IS NOT NULL THEN
        RETURN false;
    END IF;
    RETURN keypal.accept_signature(key_id, keypal.signing_secret_for(key_id), method, path,
                                   coalesce(body, ''), signature,
                                   (extract(epoch FROM age) * 1000000)::bigint);
END $$;

--------------------------------------------------------------------------------
-- Lifecycle
--------------------------------------------------------------------------------

CREATE FUNCTION keypal_revoke(id uuid DEFAULT NULL, reason text DEFAULT NULL, actor text DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    -- Unlike the bulk forms, an unknown or already revoked key is an error here.
    PERFORM keypal.lock_key(id, 'revoked');
    RETURN keypal.revoke_where(ARRAY[id], NULL, NULL, reason, actor);
END $$;

-- Revokes every key that matches and is not yet revoked; returns how many.
CREATE FUNCTION keypal.revoke_where(ids uuid[], owner text, org text, reason text, actor text)
RETURNS integer LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    who text := keypal.actor(actor);
    n integer;
BEGIN
    IF ids IS NULL AND owner IS NULL AND org IS NULL THEN
        RAISE EXCEPTION 'revoke_where: no ids, owner or org given (refusing to revoke every key)'
            USING ERRCODE = '22023';
    END IF;
    PERFORM keypal.begin_change(who);
    UPDATE keypal.keys SET revoked_at = now(), revoke_reason = reason, revoked_by = who
     WHERE (ids IS NULL OR id = ANY (ids))
       AND (owner IS NULL OR owner_id = owner)
       AND (org IS NULL OR org_id = org)
       AND (revoked_at IS NULL OR revoked_at > now());
    GET DIAGNOSTICS n = ROW_COUNT;
    PERFORM keypal.end_change();
    RETURN n;
END $$;

CREATE FUNCTION keypal_revoke_many(ids uuid[] DEFAULT NULL, reason text DEFAULT NULL, actor text DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF ids IS NULL THEN
        RAISE EXCEPTION 'invalid ids: an array of key ids is required' USING ERRCODE = '22023';
    END IF;
    IF cardinality(ids) > 10000 THEN
        RAISE EXCEPTION 'invalid ids: at most 10000 ids per call, got %', cardinality(ids) USING ERRCODE = '22023';
    END IF;
    RETURN keypal.revoke_where(ids, NULL, NULL, reason, actor);
END $$;

CREATE FUNCTION keypal_revoke_all(owner_id text DEFAULT NULL, reason text DEFAULT NULL, actor text DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF coalesce(owner_id, '') = '' THEN
        RAISE EXCEPTION 'invalid owner_id: required' USING ERRCODE = '22023';
    END IF;
    RETURN keypal.revoke_where(NULL, owner_id, NULL, reason, actor);
END $$;

CREATE FUNCTION keypal_revoke_by_owner_and_org(owner_id text DEFAULT NULL, org_id text DEFAULT NULL,
                                               reason text DEFAULT NULL, actor text DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF coalesce(owner_id, '') = '' THEN
        RAISE EXCEPTION 'invalid owner_id: required' USING ERRCODE = '22023';
    END IF;
    IF coalesce(org_id, '') = '' THEN
        RAISE EXCEPTION 'invalid org_id: required' USING ERRCODE = '22023';
    END IF;
    RETURN keypal.revoke_where(NULL, owner_id, org_id, reason, actor);
END $$;

CREATE FUNCTION keypal.set_enabled(key_id uuid, on_off boolean, actor text)
RETURNS boolean LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    k keypal.keys := keypal.lock_key(key_id, CASE WHEN on_off THEN 'enabled' ELSE 'disabled' END);
    -- A passed disable_at disables the key as surely as enabled = false: enabling clears it.
    scheduled_off boolean := k.disable_at <= clock_timestamp();
BEGIN
    IF k.enabled = on_off AND NOT (on_off AND coalesce(scheduled_off, false)) THEN
        RETURN false;
    END IF;
    PERFORM keypal.begin_change(keypal.actor(actor));
    UPDATE keypal.keys
       SET enabled = on_off,
           disable_at = CASE WHEN on_off AND scheduled_off THEN NULL ELSE keys.disable_at END
     WHERE id = k.id;
    PERFORM keypal.end_change();
    RETURN true;
END $$;

CREATE FUNCTION keypal_enable(id uuid DEFAULT NULL, actor text DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN keypal.set_enabled(id, true, actor);
END $$;

CREATE FUNCTION keypal_disable(id uuid DEFAULT NULL, actor text DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN keypal.set_enabled(id, false, actor);
END $$;

-- Enables or disables, in one statement, every key of an owner (and org) that is not revoked
-- and not already so; returns how many changed. Enabling clears a disable_at that has passed.
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
       AND NOT keypal.revoked_now(k.revoked_at, k.revoke_at)
       AND (k.enabled <> on_off OR (on_off AND k.disable_at <= clock_timestamp()));
    GET DIAGNOSTICS n = ROW_COUNT;
    PERFORM keypal.end_change();
    RETURN n;
END $$;

CREATE FUNCTION keypal_disable_all(owner_id text DEFAULT NULL, org_id text DEFAULT NULL, actor text DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN keypal.set_enabled_where(owner_id, org_id, false, actor);
END $$;

CREATE FUNCTION keypal_enable_all(owner_id text DEFAULT NULL, org_id text DEFAULT NULL, actor text DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN keypal.set_enabled_where(owner_id, org_id, true, actor);
END $$;

-- A key's settings as create options, for rotation to copy.
-- (PL/pgSQL: its expression is planned once per session, not at every call)
CREATE FUNCTION keypal.settings_of(k keypal.keys)
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

-- Moves a key's live children (not revoked, or only in a rotation's grace) to another key:
-- rotation's. Only when it has any: an UPDATE of no rows still sets off the keys' statement
-- triggers. (No child can appear meanwhile: making one locks its parent FOR SHARE, which
-- waits for the rotation's lock on it; one that appeared while the rotation waited for that
-- lock, unseen by a REPEATABLE READ snapshot, was refused already by keypal.check_children,
-- which keypal_rotate calls first.) The probe reads the parent_id index, never the
-- table: with sequential scans off, a LIMIT 1 probe is not planned as a table scan hoping
-- for an early match when a few parents hold most children (a childless key's would read
-- all of it). Here, not in keypal_rotate: with sequential scans off, a statement that must
-- still scan a table looks so costly that JIT compiles it at every call; and with JIT off.
CREATE FUNCTION keypal.move_children(from_id uuid, to_id uuid)
RETURNS void LANGUAGE plpgsql VOLATILE SET enable_seqscan = off SET jit = off AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM keypal.keys c
                WHERE c.parent_id = from_id AND (c.revoked_at IS NULL OR c.revoked_at > now())) THEN
        UPDATE keypal.keys SET parent_id = to_id
         WHERE parent_id = from_id AND (revoked_at IS NULL OR revoked_at > now());
    END IF;
END $$;

CREATE FUNCTION keypal_rotate(
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

CREATE FUNCTION keypal_update(
    id uuid DEFAULT NULL, name text DEFAULT NULL, description text DEFAULT NULL,
    tags text[] DEFAULT NULL, scopes text[] DEFAULT NULL, resources jsonb DEFAULT NULL,
    metadata jsonb DEFAULT NULL, expires_at timestamptz DEFAULT NULL, expires_in text DEFAULT NULL,
    org_id text DEFAULT NULL, rate_limit jsonb DEFAULT NULL, quota jsonb DEFAULT NULL,
    allowed_ips text[] DEFAULT NULL, blocked_ips text[] DEFAULT NULL,
    allowed_regions text[] DEFAULT NULL, blocked_regions text[] DEFAULT NULL,
    disable_at timestamptz DEFAULT NULL, revoke_at timestamptz DEFAULT NULL,
    notify_before text DEFAULT NULL, actor text DEFAULT NULL)
RETURNS keypal.key_info
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    k     keypal.keys := keypal.lock_key(id, 'updated');
    o     jsonb := keypal.normalize_options(keypal.options(
        ARRAY['name', 'description', 'tags', 'scopes', 'resources', 'metadata', 'expires_at',
              'expires_in', 'org_id', 'rate_limit', 'quota', 'allowed_ips', 'blocked_ips',
              'allowed_regions', 'blocked_regions', 'disable_at', 'revoke_at', 'notify_before'],
        ARRAY[to_jsonb(name), to_jsonb(description), to_jsonb(tags), to_jsonb(scopes), resources,
              metadata, to_jsonb(expires_at), to_jsonb(expires_in), to_jsonb(org_id), rate_limit,
              quota, to_jsonb(allowed_ips), to_jsonb(blocked_ips), to_jsonb(allowed_regions),
              to_jsonb(blocked_regions), to_jsonb(disable_at), to_jsonb(revoke_at),
              to_jsonb(notify_before)]), '', false);
    v_scopes text[] := CASE WHEN o ? 'scopes' THEN keypal.text_array(o->'scopes') ELSE k.scopes END;
    v_res    jsonb := coalesce(o->'resources', k.resources);
    v_exp    timestamptz := k.expires_at;
    v_ips    text[] := CASE WHEN o ? 'allowed_ips' THEN keypal.text_array(o->'allowed_ips') ELSE k.allowed_ips END;
    r        keypal.key_info;
BEGIN
    IF o ? 'expires_in' THEN
        v_exp := now() + keypal.parse_duration(o->>'expires_in', 'expires_in');
    ELSIF o ? 'expires_at' THEN
        v_exp := keypal.parse_timestamp(o->>'expires_at', 'expires_at');
    END IF;
    IF k.parent_id IS NOT NULL AND (o ? 'scopes' OR o ? 'resources' OR o ? 'expires_at' OR o ? 'expires_in') THEN
        PERFORM keypal.check_parent(k.parent_id, v_scopes, v_res, v_exp, '');
    END IF;
    IF o ? 'scopes' OR o ? 'resources' THEN
        PERFORM keypal.check_children(k.id, v_scopes, v_res);
    END IF;
    -- The key's policy holds after the change too.
    IF k.policy IS NOT NULL THEN
        PERFORM keypal.enforce_policy(k.policy, v_scopes, v_res, v_exp, v_ips, '');
    END IF;
    PERFORM keypal.begin_change(keypal.actor(actor));
    UPDATE keypal.keys SET
        name            = CASE WHEN o ? 'name' THEN o->>'name' ELSE keys.name END,
        description     = CASE WHEN o ? 'description' THEN o->>'description' ELSE keys.description END,
        tags            = CASE WHEN o ? 'tags' THEN keypal.text_array(o->'tags') ELSE keys.tags END,
        scopes          = v_scopes,
        resources       = v_res,
        metadata        = coalesce(o->'metadata', keys.metadata),
        expires_at      = v_exp,
        org_id          = CASE WHEN o ? 'org_id' THEN o->>'org_id' ELSE keys.org_id END,
        rate_limit      = CASE WHEN o ? 'rate_limit' THEN o->'rate_limit' ELSE keys.rate_limit END,
        quota           = CASE WHEN o ? 'quota' THEN nullif(o->'quota', 'null') ELSE keys.quota END,
        allowed_ips     = v_ips,
        blocked_ips     = CASE WHEN o ? 'blocked_ips' THEN keypal.text_array(o->'blocked_ips') ELSE keys.blocked_ips END,
        allowed_regions = CASE WHEN o ? 'allowed_regions' THEN keypal.text_array(o->'allowed_regions') ELSE keys.allowed_regions END,
        blocked_regions = CASE WHEN o ? 'blocked_regions' THEN keypal.text_array(o->'blocked_regions') ELSE keys.blocked_regions END,
        disable_at      = CASE WHEN o ? 'disable_at' THEN keypal.parse_timestamp(o->>'disable_at', 'disable_at') ELSE keys.disable_at END,
        revoke_at       = CASE WHEN o ? 'revoke_at' THEN keypal.parse_timestamp(o->>'revoke_at', 'revoke_at') ELSE keys.revoke_at END,
        notify_before   = CASE WHEN o ? 'notify_before' THEN keypal.parse_duration(o->>'notify_before', 'notify_before') ELSE keys.notify_before END
     WHERE keys.id = k.id;
    PERFORM keypal.end_change();
    SELECT * INTO r FROM keypal.key_info i WHERE i.id = k.id;
    RETURN r;
END $$;

--------------------------------------------------------------------------------
-- Reading keys
--------------------------------------------------------------------------------

CREATE FUNCTION keypal_get(id uuid DEFAULT NULL)
RETURNS keypal.key_info
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r keypal.key_info;
BEGIN
    SELECT * INTO r FROM keypal.key_info i WHERE i.id = keypal_get.id;
    IF NOT FOUND THEN
        PERFORM keypal.key_not_found(keypal_get.id, 'id');
    END IF;
    RETURN r;
END $$;

CREATE FUNCTION keypal_list(owner_id text DEFAULT NULL, org_id text DEFAULT NULL, tag text DEFAULT NULL,
                            tags text[] DEFAULT NULL, env text DEFAULT NULL,
                            include_revoked boolean DEFAULT false, "limit" integer DEFAULT NULL,
                            "offset" integer DEFAULT 0)
RETURNS SETOF keypal.key_info
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF "limit" < 0 OR "offset" < 0 THEN
        RAISE EXCEPTION 'invalid limit/offset: must not be negative' USING ERRCODE = '22023';
    END IF;
    RETURN QUERY
        SELECT i.* FROM keypal.key_info i
         WHERE (keypal_list.owner_id IS NULL OR i.owner_id = keypal_list.owner_id)
           AND (keypal_list.org_id IS NULL OR i.org_id = keypal_list.org_id)
           AND (keypal_list.tag IS NULL OR i.tags @> ARRAY[keypal_list.tag])
           AND (keypal_list.tags IS NULL OR i.tags @> keypal_list.tags)
           AND (keypal_list.env IS NULL OR i.env = keypal_list.env)
           AND (coalesce(include_revoked, false) OR i.revoked_at IS NULL OR i.revoked_at > now())
         ORDER BY i.created_at, i.id
         LIMIT "limit" OFFSET coalesce("offset", 0);
END $$;

CREATE FUNCTION keypal_list_by_org(org_id text DEFAULT NULL, include_revoked boolean DEFAULT false)
RETURNS SETOF keypal.key_info
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF coalesce(org_id, '') = '' THEN
        RAISE EXCEPTION 'invalid org_id: required' USING ERRCODE = '22023';
    END IF;
    RETURN QUERY SELECT * FROM @extschema@.keypal_list(org_id => org_id, include_revoked => include_revoked);
END $$;

CREATE FUNCTION keypal_history(id uuid DEFAULT NULL)
RETURNS SETOF keypal.key_info
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    root uuid;
BEGIN
    PERFORM 1 FROM keypal.keys k WHERE k.id = keypal_history.id;
    IF NOT FOUND THEN
        PERFORM keypal.key_not_found(keypal_history.id, 'id');
    END IF;
    WITH RECURSIVE back(kid, depth) AS (
        SELECT keypal_history.id, 0
        UNION ALL
        SELECT k.rotated_from, b.depth + 1 FROM back b JOIN keypal.keys k ON k.id = b.kid
         WHERE k.rotated_from IS NOT NULL AND b.depth < 10000)
    SELECT kid INTO root FROM back ORDER BY depth DESC LIMIT 1;
    RETURN QUERY
        WITH RECURSIVE fwd(kid, depth) AS (
            SELECT root, 0
            UNION ALL
            SELECT k.rotated_to, f.depth + 1 FROM fwd f JOIN keypal.keys k ON k.id = f.kid
             WHERE k.rotated_to IS NOT NULL AND f.depth < 10000)
        SELECT i.* FROM fwd f JOIN keypal.key_info i ON i.id = f.kid ORDER BY f.depth;
END $$;

--------------------------------------------------------------------------------
-- Usage and quotas
--------------------------------------------------------------------------------

CREATE FUNCTION keypal_usage(key_id uuid DEFAULT NULL)
RETURNS TABLE (used bigint, "limit" bigint, remaining bigint, resets_at timestamptz, period text,
               tokens bigint, cost numeric)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    k      keypal.keys;
    v_per  text;
    v_from timestamptz;
    v_used bigint;
BEGIN
    k := keypal.find_key(keypal_usage.key_id);
    v_per := coalesce(k.quota->>'period', 'month');
    v_from := date_trunc(v_per, now(), 'UTC');
    SELECT CASE WHEN q.period_start = v_from THEN q.used ELSE 0 END INTO v_used
      FROM keypal.quota_usage q WHERE q.key_id = k.id;
    -- With the preload, shared memory holds the exact count (the last moments' counts are
    -- not in the table yet).
    v_used := keypal.quota_used(k.id, v_per, coalesce(v_used, 0));
    RETURN QUERY
        SELECT coalesce(v_used, 0), (k.quota->>'limit')::bigint,
               CASE WHEN k.quota IS NOT NULL THEN greatest((k.quota->>'limit')::bigint - coalesce(v_used, 0), 0) END,
               date_trunc(v_per, now() + ('1 ' || v_per)::interval, 'UTC'), v_per,
               coalesce(sum(u.tokens), 0)::bigint, coalesce(sum(u.cost), 0)
          FROM keypal.usage u WHERE u.key_id = k.id AND u.hour >= v_from;
END $$;

CREATE FUNCTION keypal_track_usage(key_id uuid DEFAULT NULL, endpoint text DEFAULT NULL,
                                   tokens bigint DEFAULT 0, cost numeric DEFAULT 0,
                                   requests bigint DEFAULT 1)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    k keypal.keys;
BEGIN
    k := keypal.find_key(keypal_track_usage.key_id);
    IF coalesce(tokens, 0) < 0 OR coalesce(cost, 0) < 0 OR coalesce(requests, 0) < 0 THEN
        RAISE EXCEPTION 'invalid tokens/cost/requests: must not be negative' USING ERRCODE = '22023';
    END IF;
    IF cost = 'NaN'::numeric OR cost = 'Infinity'::numeric THEN
        RAISE EXCEPTION 'invalid cost: must be a finite number, not %', cost USING ERRCODE = '22023';
    END IF;
    -- 10^15, as for limits (options.rs MAX_COUNT): sums stay far from bigint's end.
    IF tokens > 1e15 THEN
        RAISE EXCEPTION 'invalid tokens: at most 1000000000000000 per call' USING ERRCODE = '22023';
    ELSIF cost > 1e15 THEN
        RAISE EXCEPTION 'invalid cost: at most 1000000000000000 per call' USING ERRCODE = '22023';
    ELSIF requests > 1e15 THEN
        RAISE EXCEPTION 'invalid requests: at most 1000000000000000 per call' USING ERRCODE = '22023';
    END IF;
    IF length(endpoint) > 1024 THEN
        RAISE EXCEPTION 'invalid endpoint: at most 1024 characters' USING ERRCODE = '22023';
    END IF;
    INSERT INTO keypal.usage AS u (key_id, hour, endpoint, requests, tokens, cost)
    VALUES (k.id, date_trunc('hour', now()), coalesce(endpoint, ''), coalesce(requests, 0),
            coalesce(tokens, 0), coalesce(cost, 0))
    ON CONFLICT ON CONSTRAINT usage_pkey DO UPDATE
        SET requests = u.requests + EXCLUDED.requests, tokens = u.tokens + EXCLUDED.tokens,
            cost = u.cost + EXCLUDED.cost;
    IF k.quota IS NOT NULL AND coalesce(requests, 0) > 0 THEN
        PERFORM keypal.count_quota_use(k.id, coalesce(k.quota->>'period', 'month'), requests);
        PERFORM keypal.quota_changed(k.id);
    END IF;
END $$;

CREATE FUNCTION keypal_analyze(key_id uuid DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    k     keypal.keys;
    facts jsonb;
BEGIN
    k := keypal.find_key(keypal_analyze.key_id);
    WITH u AS (
        SELECT x.hour, x.endpoint, x.requests FROM keypal.hourly_usage x
         WHERE x.key_id = k.id AND x.hour >= now() - interval '30 days'),
    per_hour AS (SELECT u.hour, sum(u.requests)::bigint AS r FROM u GROUP BY u.hour)
    SELECT jsonb_build_object(
        'env', k.env,
        'scopes', to_jsonb(k.scopes),
        'expires_in_days', extract(epoch FROM k.expires_at - now()) / 86400,
        'has_ip_rule', cardinality(k.allowed_ips) > 0,
        'has_rate_limit', keypal.has_rate_limit(k.rate_limit, k.policy, k.env),
        'days_since_last_use', extract(epoch FROM now() - (SELECT i.last_used_at FROM keypal.key_info i WHERE i.id = k.id)) / 86400,
        'age_days', extract(epoch FROM now() - k.created_at) / 86400,
        'by_hour', (SELECT jsonb_agg(coalesce(x.s, 0) ORDER BY h)
                      FROM generate_series(0, 23) h
                      LEFT JOIN (SELECT extract(hour FROM p.hour AT TIME ZONE 'UTC')::int AS hh, sum(p.r) AS s
                                   FROM per_hour p GROUP BY 1) x ON x.hh = h),
        'active_days', (SELECT count(DISTINCT date_trunc('day', p.hour, 'UTC')) FROM per_hour p),
        'active_hours', (SELECT count(*) FROM per_hour),
        'busiest_hour', (SELECT coalesce(max(p.r), 0) FROM per_hour p),
        'endpoints', (SELECT coalesce(jsonb_agg(jsonb_build_array(e.endpoint, e.r) ORDER BY e.r DESC, e.endpoint), '[]')
                        FROM (SELECT u.endpoint, sum(u.requests) AS r FROM u WHERE u.endpoint <> ''
                               GROUP BY u.endpoint) e))
      INTO facts;
    RETURN keypal.analyze_facts(facts);
END $$;

--------------------------------------------------------------------------------
-- Settings
--------------------------------------------------------------------------------

CREATE FUNCTION keypal_configure(prefix text DEFAULT NULL, length integer DEFAULT NULL,
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
    c keypal.settings;       -- read under the lock below
    before keypal.settings;
BEGIN
    -- No argument: only read.
    IF num_nonnulls(prefix, length, alphabet, algorithm, last_used_resolution, rate_limit, environments,
                    default_env, audit_retention, retention, webhook_timeout, webhook_max_attempts,
                    webhook_backoff, webhook_concurrency, webhook_allow_private, checksum, limit_split) = 0 THEN
        RETURN to_jsonb(keypal.config()) - 'singleton';
    END IF;
    -- One change at a time, each on top of the last committed: a second call waits here,
    -- then reads (it would otherwise write back the copy it read before the first
    -- committed, undoing it). SHARE ROW EXCLUSIVE: readers, verify's included, do not wait.
    -- (REPEATABLE READ: its snapshot still has the old row; its write then fails, 40001.)
    LOCK TABLE keypal.settings IN SHARE ROW EXCLUSIVE MODE;
    c := keypal.config();
    before := c;
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

-- issued with the shape of keys made under (length, alphabet, checksum) added, once.
CREATE FUNCTION keypal.note_shape(issued jsonb, length integer, alphabet text, checksum boolean)
RETURNS jsonb LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN issued @> jsonb_build_array(s) THEN issued ELSE issued || jsonb_build_array(s) END
      FROM jsonb_build_object('length', length, 'alphabet', alphabet, 'checksum', checksum) AS s
$$;

CREATE FUNCTION keypal_key_pattern()
RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT keypal.key_regex(
               ARRAY[c.prefix] || coalesce((SELECT array_agg(coalesce(e.value->>'prefix', c.prefix))
                                              FROM jsonb_each(c.environments) e), '{}'),
               c.length, c.alphabet, c.checksum, c.issued)
      FROM keypal.config() c
$$;

--------------------------------------------------------------------------------
-- Audit: triggers on keypal.keys, the append-only log, and its queries
--------------------------------------------------------------------------------

-- updated_at: when the key last changed, as the audit log sees changes (keypal.key_changes):
-- a write of last_used_at alone is a use, not a change; one with other columns is.
-- A key's id never changes: the audit trigger pairs a statement's old and new rows by id, so
-- an UPDATE of it (by the table's owner: no one else may write the table) would go unaudited.
CREATE FUNCTION keypal.touch_updated_at()
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

-- The outbox's writer (src/events.rs): the events, their webhook deliveries, one NOTIFY.
CREATE FUNCTION keypal.emit_events(events text[], key_ids uuid[], data jsonb[])
RETURNS bigint LANGUAGE c STRICT VOLATILE AS 'MODULE_PATHNAME', 'keypal_emit_events';

CREATE FUNCTION keypal.emit_event(event text, key_id uuid, data jsonb)
RETURNS bigint LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN keypal.emit_events(ARRAY[event], ARRAY[key_id], ARRAY[data]);
END $$;

-- The flush worker's write of what verify recorded in shared memory (src/worker.rs), one
-- call per flush: last uses, per-hour requests, quota use, quota.exceeded events. It never
-- waits for a row another transaction holds (an open keypal_revoke, or keypal_track_usage,
-- must not stall every key's flush): such a row is skipped and tried again next flush.
-- Returns ('m', key) for a key not in the table (deleted, or its creating transaction not
-- committed), then what it wrote: ('L', key), ('Q', key), ('W', key), ('H', key, hour) for
-- a last use, quota count, warning event, hour's requests (the rest is left for the next
-- flush; 'L' carries the key's last_used_at as the table now holds it); or ('x') when the
-- flush failed — then nothing of it is written.
CREATE FUNCTION keypal.flush_usage(
    lu_keys uuid[], lu_at timestamptz[],
    h_keys uuid[], h_at timestamptz[], h_n bigint[],
    q_keys uuid[], q_start timestamptz[], q_n bigint[], q_hour timestamptz[], q_hour_n bigint[],
    w_keys uuid[], w_used bigint[], resolution interval)
RETURNS TABLE (kind "char", key_id uuid, at timestamptz)
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
    attempt int;
    l_keys uuid[];
    l_at timestamptz[];
    qa_keys uuid[];
    qa_start timestamptz[];
    qa_n bigint[];
    qa_hour timestamptz[];
    qa_hn bigint[];
    ha_keys uuid[];
    ha_at timestamptz[];
    ha_n bigint[];
    done_l uuid[];
    done_l_at timestamptz[];
    same_l uuid[];
    same_l_at timestamptz[];
    more_l uuid[];
    more_l_at timestamptz[];
    done_q uuid[];
    done_q_hour timestamptz[];
    more_q uuid[];
    more_q_hour timestamptz[];
    done_w uuid[];
    done_h uuid[];
    done_h_at timestamptz[];
    more_h uuid[];
    more_h_at timestamptz[];
BEGIN
    -- No step waits long for a lock (a row, or a table another transaction alters): the
    -- flush fails and is tried again, rather than stalling.
    PERFORM set_config('lock_timeout', '200ms', true);
    -- Every step below is driven by the batch, one index probe per item (the planner
    -- cannot know the arrays' lengths: no join of two arrays may be left to it).
    -- Last uses: a row is moved on only by last_used_resolution or more; rows another
    -- transaction holds are skipped. What the table then holds comes back with 'L'.
    -- The common case: no row is held, and one plain UPDATE does it (locking each row
    -- first would cost a WAL record per row). A held row makes it wait at most 20 ms; then
    -- the rows no other transaction holds are kept (and locked) and it runs again.
    -- Rows within the resolution are left as they are: reported with what they hold (read
    -- before the update, which moves only the others).
    SELECT array_agg(u.key_id), array_agg(u.last_used_at) INTO same_l, same_l_at
      FROM unnest(lu_keys, lu_at) AS f(id, at) JOIN keypal.key_usage u ON u.key_id = f.id
     WHERE f.at < u.last_used_at + resolution;
    l_keys := lu_keys; l_at := lu_at;
    FOR attempt IN 1..3 LOOP
        BEGIN
            PERFORM set_config('lock_timeout', '20ms', true);
            WITH done AS (
                UPDATE keypal.key_usage u SET last_used_at = f.at
                  FROM unnest(l_keys, l_at) AS f(id, at)
                 WHERE u.key_id = f.id AND f.at >= u.last_used_at + resolution
                RETURNING u.key_id, u.last_used_at)
            SELECT array_agg(key_id), array_agg(last_used_at) INTO done_l, done_l_at FROM done;
            EXIT;
        EXCEPTION WHEN lock_not_available THEN
            SELECT array_agg(s.id), array_agg(s.at) INTO l_keys, l_at
              FROM (SELECT f.id, f.at FROM unnest(l_keys, l_at) AS f(id, at)
                      JOIN keypal.key_usage u ON u.key_id = f.id
                       FOR NO KEY UPDATE OF u SKIP LOCKED) s;
        END;
    END LOOP;
    IF coalesce(cardinality(done_l), 0) + coalesce(cardinality(same_l), 0)
       < coalesce(cardinality(lu_keys), 0) THEN  -- rows to add
    BEGIN
        PERFORM set_config('lock_timeout', '100ms', true);
        WITH ins AS (
            INSERT INTO keypal.key_usage AS u (key_id, last_used_at)
            SELECT f.id, f.at FROM unnest(lu_keys, lu_at) AS f(id, at)
             WHERE NOT EXISTS (SELECT 1 FROM keypal.key_usage x WHERE x.key_id = f.id)
               AND EXISTS (SELECT 1 FROM keypal.keys k WHERE k.id = f.id)
            ON CONFLICT (key_id) DO NOTHING
            RETURNING u.key_id, u.last_used_at)
        SELECT array_agg(key_id), array_agg(last_used_at) INTO more_l, more_l_at FROM ins;
    EXCEPTION WHEN lock_not_available THEN
        NULL;  -- left for the next flush
    END;
    END IF;

    -- Quota use: rows that exist and are free are updated; a key without one gets it
    -- inserted (waiting at most 100 ms for another transaction inserting the same).
    -- A key's hour that is over moves from its quota row to keypal.usage when the key's
    -- next hour arrives (driven by the batch: only its keys' rows, and only at an hour's turn).
    BEGIN
        PERFORM set_config('lock_timeout', '100ms', true);
        WITH old AS (
            SELECT q.key_id, q.hour, q.hour_requests
              FROM unnest(q_keys, q_hour) AS f(id, hour)
              JOIN keypal.quota_usage q ON q.key_id = f.id
             WHERE q.hour < f.hour
               FOR NO KEY UPDATE OF q SKIP LOCKED),
        cleared AS (UPDATE keypal.quota_usage q SET hour = NULL, hour_requests = 0
                      FROM old WHERE q.key_id = old.key_id)
        INSERT INTO keypal.usage AS u (key_id, hour, endpoint, requests)
        SELECT old.key_id, old.hour, '', old.hour_requests FROM old WHERE old.hour_requests > 0
        ON CONFLICT ON CONSTRAINT usage_pkey DO UPDATE SET requests = u.requests + EXCLUDED.requests;
    EXCEPTION WHEN lock_not_available THEN
        NULL;  -- a later flush moves them
    END;
    -- The quota's use and the hour's requests, one row update per key (as for last uses:
    -- plainly, or without the rows another transaction holds). An hour the row cannot take
    -- (it still holds an earlier one with requests) is reported unwritten.
    qa_keys := q_keys; qa_start := q_start; qa_n := q_n; qa_hour := q_hour; qa_hn := q_hour_n;
    FOR attempt IN 1..3 LOOP
        BEGIN
            PERFORM set_config('lock_timeout', '20ms', true);
            WITH done AS (
                UPDATE keypal.quota_usage q
                   SET used = CASE WHEN q.period_start = f.start THEN q.used + f.n
                                   WHEN q.period_start < f.start THEN f.n
                                   ELSE q.used END,
                       period_start = greatest(q.period_start, f.start),
                       hour = CASE WHEN f.hour IS NULL OR (q.hour IS DISTINCT FROM f.hour AND q.hour_requests > 0)
                                   THEN q.hour ELSE f.hour END,
                       hour_requests = CASE WHEN f.hour IS NULL THEN q.hour_requests
                                            WHEN q.hour = f.hour THEN q.hour_requests + f.hn
                                            WHEN q.hour_requests > 0 THEN q.hour_requests
                                            ELSE f.hn END
                  FROM unnest(qa_keys, qa_start, qa_n, qa_hour, qa_hn) AS f(id, start, n, hour, hn)
                 WHERE q.key_id = f.id
                RETURNING q.key_id, CASE WHEN q.hour = f.hour THEN f.hour END AS hour)
            SELECT array_agg(key_id), array_agg(hour) INTO done_q, done_q_hour FROM done;
            EXIT;
        EXCEPTION WHEN lock_not_available THEN
            SELECT array_agg(s.id), array_agg(s.start), array_agg(s.n), array_agg(s.hour), array_agg(s.hn)
              INTO qa_keys, qa_start, qa_n, qa_hour, qa_hn
              FROM (SELECT f.* FROM unnest(qa_keys, qa_start, qa_n, qa_hour, qa_hn) AS f(id, start, n, hour, hn)
                      JOIN keypal.quota_usage q ON q.key_id = f.id
                       FOR NO KEY UPDATE OF q SKIP LOCKED) s;
        END;
    END LOOP;
    IF coalesce(cardinality(done_q), 0) < coalesce(cardinality(q_keys), 0) THEN
    BEGIN
        PERFORM set_config('lock_timeout', '100ms', true);
        WITH ins AS (
            INSERT INTO keypal.quota_usage AS q (key_id, period_start, used, hour, hour_requests)
            SELECT f.id, f.start, f.n, f.hour, coalesce(f.hn, 0)
              FROM unnest(q_keys, q_start, q_n, q_hour, q_hour_n) AS f(id, start, n, hour, hn)
             WHERE NOT EXISTS (SELECT 1 FROM keypal.quota_usage x WHERE x.key_id = f.id)
               AND EXISTS (SELECT 1 FROM keypal.keys k WHERE k.id = f.id)
            ON CONFLICT (key_id) DO NOTHING
            RETURNING q.key_id, q.hour)
        SELECT array_agg(key_id), array_agg(hour) INTO more_q, more_q_hour FROM ins;
    EXCEPTION WHEN lock_not_available THEN
        NULL;  -- left for the next flush
    END;
    END IF;

    -- Other hours' requests (a key whose quota was not written with them, or an earlier hour
    -- at an hour's turn) go to keypal.usage, a row per key and hour (keypal_track_usage
    -- without an endpoint counts in the same row). The worker sends each key and hour once.
    ha_keys := h_keys; ha_at := h_at; ha_n := h_n;
    FOR attempt IN 1..3 LOOP
        BEGIN
            PERFORM set_config('lock_timeout', '20ms', true);
            WITH done AS (
                UPDATE keypal.usage u SET requests = u.requests + f.n
                  FROM unnest(ha_keys, ha_at, ha_n) AS f(id, at, n)
                 WHERE u.key_id = f.id AND u.hour = f.at AND u.endpoint = ''
                RETURNING u.key_id, u.hour)
            SELECT array_agg(key_id), array_agg(hour) INTO done_h, done_h_at FROM done;
            EXIT;
        EXCEPTION WHEN lock_not_available THEN
            SELECT array_agg(s.id), array_agg(s.at), array_agg(s.n) INTO ha_keys, ha_at, ha_n
              FROM (SELECT f.* FROM unnest(ha_keys, ha_at, ha_n) AS f(id, at, n)
                      JOIN keypal.usage u ON u.key_id = f.id AND u.hour = f.at AND u.endpoint = ''
                       FOR NO KEY UPDATE OF u SKIP LOCKED) s;
        END;
    END LOOP;
    IF coalesce(cardinality(done_h), 0) < coalesce(cardinality(h_keys), 0) THEN
    BEGIN
        PERFORM set_config('lock_timeout', '100ms', true);
        WITH ins AS (
            INSERT INTO keypal.usage AS u (key_id, hour, endpoint, requests)
            SELECT f.id, f.at, '', f.n FROM unnest(h_keys, h_at, h_n) AS f(id, at, n)
             WHERE NOT EXISTS (SELECT 1 FROM keypal.usage x
                                WHERE x.key_id = f.id AND x.hour = f.at AND x.endpoint = '')
               AND EXISTS (SELECT 1 FROM keypal.keys k WHERE k.id = f.id)
            ON CONFLICT ON CONSTRAINT usage_pkey DO NOTHING
            RETURNING u.key_id, u.hour)
        SELECT array_agg(key_id), array_agg(hour) INTO more_h, more_h_at FROM ins;
    EXCEPTION WHEN lock_not_available THEN
        NULL;
    END;
    END IF;
    PERFORM set_config('lock_timeout', '200ms', true);

    WITH ev AS (
        SELECT k.id, keypal.emit_event('quota.exceeded', k.id,
                   jsonb_build_object('keyId', k.id, 'limit', k.quota->'limit',
                                      'used', f.used, 'period', coalesce(k.quota->'period', '"month"')))
          FROM unnest(w_keys, w_used) AS f(id, used) JOIN keypal.keys k ON k.id = f.id)
    SELECT array_agg(id) INTO done_w FROM ev;

    -- Keys not in keypal.keys (only looked for when something was left unwritten).
    IF coalesce(cardinality(done_l), 0) + coalesce(cardinality(more_l), 0) + coalesce(cardinality(same_l), 0)
          < coalesce(cardinality(lu_keys), 0)
       OR coalesce(cardinality(done_q), 0) + coalesce(cardinality(more_q), 0) < coalesce(cardinality(q_keys), 0)
       OR coalesce(cardinality(done_h), 0) + coalesce(cardinality(more_h), 0) < coalesce(cardinality(h_keys), 0)
       OR coalesce(cardinality(array_remove(done_q_hour, NULL)), 0) + coalesce(cardinality(array_remove(more_q_hour, NULL)), 0)
          < coalesce(cardinality(array_remove(q_hour, NULL)), 0)
       OR coalesce(cardinality(done_w), 0) < coalesce(cardinality(w_keys), 0) THEN
        RETURN QUERY
        SELECT 'm'::"char", a.id, NULL::timestamptz
          FROM (SELECT unnest(lu_keys) UNION SELECT unnest(h_keys) UNION SELECT unnest(q_keys)
                UNION SELECT unnest(w_keys)) AS a(id)
         WHERE NOT EXISTS (SELECT 1 FROM keypal.keys k WHERE k.id = a.id);

    END IF;

    -- The commit that follows must not time out (NOTIFY's queue lock, for one).
    PERFORM set_config('lock_timeout', '0', true);
    -- What was written.
    RETURN QUERY
        SELECT 'L'::"char", d.id, d.at FROM unnest(done_l, done_l_at) AS d(id, at)
        UNION ALL SELECT 'L', d.id, d.at FROM unnest(more_l, more_l_at) AS d(id, at)
        UNION ALL SELECT 'L', d.id, d.at FROM unnest(same_l, same_l_at) AS d(id, at)
        UNION ALL SELECT 'Q', d.id, NULL FROM unnest(done_q) AS d(id)
        UNION ALL SELECT 'Q', d.id, NULL FROM unnest(more_q) AS d(id)
        UNION ALL SELECT 'W', d.id, NULL FROM unnest(done_w) AS d(id)
        UNION ALL SELECT 'H', d.id, d.at FROM unnest(done_h, done_h_at) AS d(id, at)
        UNION ALL SELECT 'H', d.id, d.at FROM unnest(more_h, more_h_at) AS d(id, at)
        UNION ALL SELECT 'H', d.id, d.at FROM unnest(done_q, done_q_hour) AS d(id, at) WHERE d.at IS NOT NULL
        UNION ALL SELECT 'H', d.id, d.at FROM unnest(more_q, more_q_hour) AS d(id, at) WHERE d.at IS NOT NULL;
EXCEPTION WHEN OTHERS THEN
    PERFORM set_config('lock_timeout', '0', true);
    RAISE WARNING 'keypal flush worker: % (SQLSTATE %); everything of this flush is kept for the next one',
        SQLERRM, SQLSTATE;
    RETURN QUERY SELECT 'x'::"char", NULL::uuid, NULL::timestamptz;
END $$;

-- Who acts and why, as the management function set them (keypal.begin_change).
CREATE FUNCTION keypal.change_actor()
RETURNS text LANGUAGE sql STABLE AS $$
    SELECT keypal.actor(current_setting('keypal._actor', true))
$$;

CREATE FUNCTION keypal.change_context()
RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT coalesce(nullif(current_setting('keypal._context', true), '')::jsonb, '{}')
$$;

-- A key event's data (the webhook body's "data").
CREATE FUNCTION keypal.event_data(act text, r keypal.keys, who text)
RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT jsonb_strip_nulls(jsonb_build_object(
        'keyId', r.id, 'ownerId', r.owner_id, 'orgId', r.org_id, 'env', r.env, 'name', r.name,
        'revokedBy', CASE WHEN act = 'revoked' THEN r.revoked_by END,
        'reason', CASE WHEN act = 'revoked' THEN r.revoke_reason END,
        'rotatedTo', CASE WHEN act = 'rotated' THEN r.rotated_to END,
        'actor', who))
$$;

-- Restoring a dump (a COPY into keypal.keys, outside any keypal function, by the table's
-- owner or a superuser: pg_restore's roles): the rows bring their own audit history, events
-- and timers, restored alongside. Another role's COPY is audited as any INSERT is.
CREATE FUNCTION keypal.restoring(relid oid)
RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    RETURN coalesce(current_setting('keypal._actor', true), '') = '' AND keypal.copying_into(relid)
       AND pg_has_role(current_user, (SELECT c.relowner FROM pg_class c WHERE c.oid = relid), 'USAGE');
END $$;

-- The audit rows and events of one statement's changes to keys, from its transition tables:
-- one audit row per key changed (created, updated, enabled, disabled, revoked, rotated,
-- deleted, imported), one event per created, updated, enabled, disabled, revoked or rotated
-- key, one NOTIFY for the statement. Set-based: a statement over 100 000 keys is three
-- INSERTs here, not 100 000 trigger calls.
CREATE FUNCTION keypal.audit_inserted_keys()
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

-- What changed between two versions of a key: {"col": {"old": …, "new": …}} for every column
-- but updated_at and last_used_at (a use is not a change; tests/sql/16_bulk.sql checks the
-- list against the table), and {"key_hash": "changed"} for a new hash; column by column
-- rather than whole rows as JSON. PL/pgSQL so that the
-- expression is planned once per session, not once per statement.
CREATE FUNCTION keypal.key_changes(o keypal.keys, n keypal.keys)
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

CREATE FUNCTION keypal.audit_updated_keys()
RETURNS trigger LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET jit = off SET enable_nestloop = off AS $$
DECLARE
    given text := nullif(current_setting('keypal._action', true), '');
    depth int := coalesce(nullif(current_setting('keypal._depth', true), '')::int, 0);
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
                WHEN given = 'imported' AND pg_trigger_depth() = depth + 1 THEN 'imported'
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

-- Revoking keys revokes every descendant in the same transaction: one UPDATE per level of
-- the hierarchy (it sets this trigger off again, one level down).
CREATE FUNCTION keypal.cascade_revocation()
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

-- The children of these keys, revoked as their parent was: one probe of the parent_id index
-- per parent (a nested loop, whatever the planner guesses of the array's size: one parent or
-- a hundred thousand; the triggers turn nested loops off for joining old and new rows).
-- PL/pgSQL, so that the UPDATE is planned once per session (a SQL function with SET clauses
-- is parsed and planned at every call: a third of revoking one key). A kept plan made while
-- keypal.keys was small must still probe the index: sequential scans and materializing are
-- off (a scan of the whole table per parent otherwise, until the next ANALYZE), and JIT too
-- (a plan that must scan a table anyway would look costly enough to compile at every call).
CREATE FUNCTION keypal.revoke_children(parents uuid[], moments timestamptz[], revokers text[])
RETURNS void LANGUAGE plpgsql VOLATILE SET enable_nestloop = on SET enable_hashjoin = off SET enable_mergejoin = off
    SET enable_seqscan = off SET enable_material = off SET jit = off AS $$
BEGIN
    UPDATE keypal.keys c
       SET revoked_at = p.revoked_at, revoke_reason = 'parent revoked', revoked_by = p.revoked_by
      FROM unnest(parents, moments, revokers) AS p(id, revoked_at, revoked_by)
     WHERE c.parent_id = p.id AND keypal.cascades_to(c.revoked_at, p.revoked_at);
END $$;
-- Only the extension's owner may change or remove audit rows.
CREATE FUNCTION keypal.audit_log_guard()
RETURNS trigger LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_extension e
                    WHERE e.extname = 'keypal' AND e.extowner = current_user::regrole) THEN
        RAISE EXCEPTION 'keypal.audit_log is append-only' USING ERRCODE = '42501';
    END IF;
    RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
END $$;

-- verify caches the settings per backend; any change to them invalidates every cache.
CREATE FUNCTION keypal.settings_changed()
RETURNS trigger LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM keypal.invalidate_settings_cache(TG_RELID);
    RETURN NULL;
END $$;
CREATE TRIGGER settings_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON keypal.settings
    FOR EACH STATEMENT EXECUTE FUNCTION keypal.settings_changed();
CREATE TRIGGER policies_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON keypal.policies
    FOR EACH STATEMENT EXECUTE FUNCTION keypal.settings_changed();

CREATE TRIGGER keys_updated_at BEFORE UPDATE ON keypal.keys
    FOR EACH ROW EXECUTE FUNCTION keypal.touch_updated_at();
-- (keypal.create_keys records its own rows: src/audit.rs)
CREATE TRIGGER keys_audit AFTER INSERT ON keypal.keys REFERENCING NEW TABLE AS keypal_new
    FOR EACH STATEMENT WHEN (NOT keypal.audit_written())
    EXECUTE FUNCTION keypal.audit_inserted_keys();
CREATE TRIGGER keys_audit_delete AFTER DELETE ON keypal.keys REFERENCING OLD TABLE AS keypal_old
    FOR EACH STATEMENT EXECUTE FUNCTION keypal.audit_deleted_keys();
CREATE TRIGGER keys_audit_update AFTER UPDATE ON keypal.keys
    REFERENCING OLD TABLE AS keypal_old NEW TABLE AS keypal_new
    FOR EACH STATEMENT EXECUTE FUNCTION keypal.audit_updated_keys();
CREATE TRIGGER keys_cascade_revocation AFTER UPDATE ON keypal.keys
    REFERENCING OLD TABLE AS keypal_old NEW TABLE AS keypal_new
    FOR EACH STATEMENT EXECUTE FUNCTION keypal.cascade_revocation();
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON keypal.audit_log
    FOR EACH ROW EXECUTE FUNCTION keypal.audit_log_guard();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON keypal.audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION keypal.audit_log_guard();

CREATE FUNCTION keypal_audit(key_id uuid DEFAULT NULL, owner_id text DEFAULT NULL, org_id text DEFAULT NULL,
                             action text DEFAULT NULL, since timestamptz DEFAULT NULL,
                             until timestamptz DEFAULT NULL, "limit" integer DEFAULT 100,
                             "offset" integer DEFAULT 0)
RETURNS SETOF keypal.audit_log
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF action IS NOT NULL AND action NOT IN ('created', 'updated', 'enabled', 'disabled', 'revoked',
                                             'rotated', 'expired', 'deleted', 'imported') THEN
        RAISE EXCEPTION 'invalid action: % is not an audit action', quote_literal(action)
            USING ERRCODE = '22023',
                  HINT = 'one of created, updated, enabled, disabled, revoked, rotated, expired, deleted, imported';
    END IF;
    IF "limit" IS NULL OR "limit" < 0 OR "limit" > 10000 THEN
        RAISE EXCEPTION 'invalid limit: must be between 0 and 10000' USING ERRCODE = '22023';
    END IF;
    IF "offset" IS NULL OR "offset" < 0 THEN
        RAISE EXCEPTION 'invalid offset: must not be negative' USING ERRCODE = '22023';
    END IF;
    RETURN QUERY
        SELECT a.* FROM keypal.audit_log a
         WHERE (keypal_audit.key_id IS NULL OR a.key_id = keypal_audit.key_id)
           AND (keypal_audit.owner_id IS NULL OR a.owner_id = keypal_audit.owner_id)
           AND (keypal_audit.org_id IS NULL OR a.org_id = keypal_audit.org_id)
           AND (keypal_audit.action IS NULL OR a.action = keypal_audit.action)
           AND (since IS NULL OR a.at >= since)
           AND (until IS NULL OR a.at < until)
         ORDER BY a.at DESC, a.id DESC
         LIMIT "limit" OFFSET "offset";
END $$;

CREATE FUNCTION keypal_audit_stats(owner_id text DEFAULT NULL, since timestamptz DEFAULT NULL,
                                   until timestamptz DEFAULT NULL)
RETURNS TABLE (total bigint, by_action jsonb, last_activity timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    WITH hits AS (
        SELECT a.action, a.at FROM keypal.audit_log a
         WHERE (keypal_audit_stats.owner_id IS NULL OR a.owner_id = keypal_audit_stats.owner_id)
           AND (since IS NULL OR a.at >= since)
           AND (until IS NULL OR a.at < until)),
    per AS (SELECT h.action, count(*) AS n FROM hits h GROUP BY h.action)
    SELECT (SELECT count(*) FROM hits),
           (SELECT coalesce(jsonb_object_agg(per.action, per.n), '{}') FROM per),
           (SELECT max(h.at) FROM hits h)
$$;

--------------------------------------------------------------------------------
-- Comments: every user-facing function documents itself in \df+
--------------------------------------------------------------------------------

DO $$
DECLARE
    doc record;
    fn regprocedure;
BEGIN
    FOR doc IN SELECT * FROM (VALUES
        ('keypal_configure', 'Changes keypal''s settings (prefix, length, alphabet, algorithm, last_used_resolution, rate_limit, environments, default_env, retention (what keypal_run_maintenance prunes: {"events": "30d", "webhook_deliveries": "30d", "usage": "400d", "audit_log": ...}), audit_retention, webhook_timeout, webhook_max_attempts, webhook_backoff, webhook_concurrency, webhook_allow_private, checksum (new keys end in a checksum verify checks without a lookup), limit_split (n servers each enforce their share of every rate limit and quota: a standby floor(limit / n), the primary the rest)); NULL leaves a setting, JSON null clears it; no argument only reads. Returns all settings as jsonb.'),
        ('keypal_key_pattern', 'A regular expression matching the keys this database issues (its prefixes, the random part and checksum in its alphabet), for secret scanners (gitleaks, GitHub secret scanning). Not anchored.'),
        ('keypal_create', 'Creates an API key. Returns the plaintext key once (only its hash is stored), its id, expiry and environment.'),
        ('keypal_create_read_only', 'keypal_create with scopes {read}.'),
        ('keypal_create_full_access', 'keypal_create with scopes {read,write,admin}.'),
        ('keypal_create_many', 'Creates one key per element of a JSON array of option objects, in order, all or nothing.'),
        ('keypal_define_template', 'Defines (or replaces) a named set of key options for keypal_create_from_template.'),
        ('keypal_create_from_template', 'Creates a key from a template''s options, with owner_id, name and overrides applied on top.'),
        ('keypal_define_policy', 'Defines (or replaces) a key policy: allowed scopes/resources, max_ttl, require_ip, max_resources. keypal_create(policy => ...) enforces it.'),
        ('keypal_stats', 'This server''s counters (name, value): verifies since server start by outcome (verifies_valid and verifies_<code> for each error code, verifies_total), flush_lag_ms (since this database''s flush worker last flushed), shared_entries and shared_bytes in use, shared_entry_bytes, shared_entries_max, shared_queued, dropped_uses, flush_workers. Reads shared memory only.'),
        ('keypal_verify', 'Verifies an API key (a Bearer prefix is ignored) for a scope, scopes, resource, ip, country and env. Returns keypal.verify_result: valid, or the first failing error_code.'),
        ('keypal_verify_many', 'keypal_verify for each key of an array; one result per key, in order.'),
        ('keypal_verify_headers', 'keypal_verify with the key taken from headers: Authorization (Bearer) first, then X-API-Key; names case-insensitive.'),
        ('keypal_check', 'keypal_verify(...).valid as a boolean.'),
        ('keypal_require', 'keypal_verify, raising on failure: 28000 (bad key), 42501 (env/IP/region/scope), 53400 (limits); the error code in DETAIL.'),
        ('keypal_authenticate', 'keypal_require, then remembers the key''s identity for this transaction (see keypal_current_*). Cannot be forged by SET.'),
        ('keypal_authenticate_request', 'keypal_authenticate with the key from PostgREST''s request.headers; usable as db-pre-request.'),
        ('keypal_current_key_id', 'The id of the key authenticated in this transaction, or NULL.'),
        ('keypal_current_owner', 'The owner_id of the key authenticated in this transaction, or NULL. For RLS policies.'),
        ('keypal_current_org', 'The org_id of the key authenticated in this transaction, or NULL.'),
        ('keypal_current_scopes', 'The global scopes of the key authenticated in this transaction, or NULL.'),
        ('keypal_current_has_scope', 'Whether the key authenticated in this transaction holds scope (globally or on resource).'),
        ('keypal_has_scope', 'Whether a key holds scope: globally, on resource, or by *. Answers only for the authenticated key or callers allowed keypal_get.'),
        ('keypal_has_any_scope', 'Whether a key holds any of scopes (see keypal_has_scope).'),
        ('keypal_has_all_scopes', 'Whether a key holds all of scopes (see keypal_has_scope).'),
        ('keypal_revoke', 'Revokes a key for good, and by cascade all its descendant keys, in this transaction. Returns 1.'),
        ('keypal_revoke_many', 'Revokes the given keys; returns how many were newly revoked (already revoked ones are skipped).'),
        ('keypal_revoke_all', 'Revokes every key of an owner; returns how many were newly revoked.'),
        ('keypal_disable_all', 'Disables every key of an owner (and org_id, if given) that is not revoked, in one statement; returns how many were newly disabled.'),
        ('keypal_enable_all', 'Enables every disabled key of an owner (and org_id, if given) that is not revoked, in one statement, clearing a passed disable_at; returns how many were newly enabled.'),
        ('keypal_revoke_by_owner_and_org', 'Revokes every key of an owner in an org; returns how many were newly revoked.'),
        ('keypal_enable', 'Enables a disabled key (never a revoked one). Returns whether it changed.'),
        ('keypal_disable', 'Disables a key temporarily (keypal_enable undoes it). Returns whether it changed.'),
        ('keypal_rotate', 'Replaces a key by a new one with the same settings (overrides allowed); the old key stops verifying after grace (default: at once).'),
        ('keypal_update', 'Changes only the given settings of a key (never its plaintext); JSON null clears rate_limit/quota. Returns the key.'),
        ('keypal_get', 'A key''s public columns (never its hash); KEY_NOT_FOUND (P0002) if there is none.'),
        ('keypal_list', 'Keys filtered by owner, org, tag(s) and env; revoked ones only with include_revoked.'),
        ('keypal_list_by_org', 'The keys of an org.'),
        ('keypal_history', 'The rotation chain a key belongs to, oldest first.'),
        ('keypal_usage', 'A key''s quota use in the current period (used, limit, remaining, resets_at, period) and the tokens and cost tracked in it.'),
        ('keypal_track_usage', 'Records custom usage for a key: requests (counted against its quota), tokens and cost, per hour and endpoint.'),
        ('keypal_analyze', 'A deterministic report on a key: suggested_name, usage_pattern, security_score (0-100), recommendations, peak hours and top endpoints, from its settings and the last 30 days of usage.'),
        ('keypal_audit', 'Audit log entries, newest first, filtered by key, owner, org, action and time.'),
        ('keypal_audit_stats', 'Audit totals: count, count per action and last activity, for an owner and time range.'),
        ('keypal_sign', 'Signs a request: ''t=<unix seconds>,v1=<hex hmac-sha256(secret, METHOD || E''\\n'' || path || E''\\n'' || t || E''\\n'' || lower-hex(sha256(body)))>''. For clients holding a signing_secret.'),
        ('keypal_verify_signature', 'Whether signature signs this request (method, path, body) with the key''s signing secret, is at most max_age old (default 5m; at most a minute ahead), was not seen before within max_age, and the key is a signing key that would verify now.'),
        ('keypal_export', 'Every key of an owner and/or org (NULL: all) as a JSON array of records: each key''s settings, state, links and hash (key_hash as hex; never a plaintext). keypal_import reads it back.'),
        ('keypal_export_records', 'keypal_export one record per row, for exports too large for one jsonb value (COPY (SELECT ...) TO ...).'),
        ('keypal_import', 'Imports key records (keypal_export''s, or the TypeScript keypal''s {id, keyHash, metadata}) in one transaction: all checked first (a bad one raises naming data[i].field; nothing is written), then written and audited as imported. on_conflict: error (default), skip or overwrite (never un-revokes). Returns imported, skipped, overwritten.'),
        ('keypal_add_webhook', 'Adds a webhook: every event named in events (default: all, ''*'') is POSTed to url, signed with secret (Keypal-Signature: t=<unix>,v1=<hex hmac-sha256(secret, t.body)>), by the flush worker, at least once. Returns its id. The secret is write-only.'),
        ('keypal_update_webhook', 'Changes a webhook''s url, secret or events (NULL leaves each as it is). Returns whether it exists.'),
        ('keypal_list_webhooks', 'The webhooks (never their secrets), with their pending and dead deliveries and their last attempt.'),
        ('keypal_enable_webhook', 'Enables a webhook: its pending deliveries resume, new events are queued for it. Returns whether it changed.'),
        ('keypal_disable_webhook', 'Disables a webhook: nothing is delivered to it, and no event is queued for it, until it is enabled. Returns whether it changed.'),
        ('keypal_remove_webhook', 'Removes a webhook, with its pending deliveries and its delivery log.'),
        ('keypal_redeliver', 'Queues an event''s dead deliveries (of one webhook, or all) again, with a fresh set of attempts. Returns how many.'),
        ('keypal_run_maintenance', 'Applies due schedules (disable_at, revoke_at: state, audit, events; key.expiring at notify_before, key.expired at expiry, each once), resets quota periods that rolled over, prunes per retention; in batches of batch_size, committing after each. Idempotent; safe to run concurrently. Ready for pg_cron.'),
        ('keypal_maintenance_step', 'One batch of keypal_run_maintenance''s work, in the caller''s transaction; returns whether more is left. keypal_run_maintenance calls it until done (grant both to whoever runs maintenance).')
    ) AS t(name, comment) LOOP
        FOR fn IN SELECT p.oid::regprocedure FROM pg_proc p
                   WHERE p.proname = doc.name AND p.pronamespace = '@extschema@'::regnamespace LOOP
            EXECUTE format('COMMENT ON ROUTINE %s IS %L', fn, doc.comment);
        END LOOP;
    END LOOP;
END $$;

--------------------------------------------------------------------------------
-- Privileges (SPEC §6): PUBLIC may run the verify family only; nothing else, no table.
--------------------------------------------------------------------------------

DO $$
DECLARE
    fn regprocedure;
BEGIN
    FOR fn IN SELECT p.oid::regprocedure FROM pg_proc p
                JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
                JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'keypal' LOOP
        EXECUTE format('REVOKE ALL ON ROUTINE %s FROM PUBLIC', fn);
    END LOOP;
    FOR fn IN SELECT p.oid::regprocedure FROM pg_proc p
               WHERE p.pronamespace = '@extschema@'::regnamespace
                 AND p.proname IN ('keypal_verify', 'keypal_verify_many', 'keypal_verify_headers',
                                   'keypal_check', 'keypal_require', 'keypal_authenticate',
                                   'keypal_authenticate_request', 'keypal_current_key_id',
                                   'keypal_current_owner', 'keypal_current_org',
                                   'keypal_current_scopes', 'keypal_current_has_scope',
                                   'keypal_has_scope', 'keypal_has_any_scope', 'keypal_has_all_scopes',
                                   'keypal_sign', 'keypal_verify_signature') LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO PUBLIC', fn);
    END LOOP;
END $$;
REVOKE ALL ON ALL TABLES IN SCHEMA keypal FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA keypal FROM PUBLIC;


COMMENT ON FUNCTION keypal.replica_counts(text, bigint, text) IS 'On the primary: takes a standby worker''s batch of counts (last uses, hours, quota counts, rate-window admissions) into the shared state, once per batch number, and answers with each key''s global count. Grant EXECUTE only to the role standbys ship as (keypal.primary_conninfo, else primary_conninfo).';
