-- keypal 0.1.0 -> 0.2.0 (ALTER EXTENSION keypal UPDATE).
-- New: keypal_export, keypal_export_records, keypal_import (and keypal.import_record,
-- keypal.export_record); the audit trigger records an import's overwrite as imported;
-- key timers are not armed for moments that passed before a key was imported. Errors that
-- teach: a NULL id (22004), a duration without a unit, templates checked when defined,
-- environments checked everywhere (keypal.check_env), NULL webhook ids, keypal_configure() only reads,
-- keypal_usage without a quota, keypal_analyze's advice on young keys. Scannable keys:
-- keypal_configure(checksum => true), keypal_key_pattern().
-- (keypal.previous_salt and keypal.typescript_salt are server settings: nothing to change in
-- the database.)
-- tests/shell/upgrade.t checks that this leaves the schema a fresh 0.2.0 install makes.

CREATE FUNCTION keypal."import_record"(
	"rec" TEXT, /* & str */
	"index" INT /* i32 */
) RETURNS jsonb /* JsonB */
IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'import_record_wrapper';

CREATE FUNCTION keypal."key_checksum"(
	"body" TEXT, /* & str */
	"alphabet" TEXT /* & str */
) RETURNS TEXT /* String */
IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'key_checksum_wrapper';

CREATE FUNCTION keypal."key_regex"(
	"prefixes" TEXT[], /* Vec < String > */
	"length" INT, /* i32 */
	"alphabet" TEXT, /* & str */
	"checksum" bool, /* bool */
	"issued" jsonb /* Option < JsonB > */
) RETURNS TEXT /* String */
IMMUTABLE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'key_regex_wrapper';

-- Scannable keys: the setting (last in the table, as a fresh install makes it).
ALTER TABLE keypal.settings ADD COLUMN checksum boolean NOT NULL DEFAULT false;
ALTER TABLE keypal.settings ADD COLUMN issued jsonb NOT NULL DEFAULT '[]';
CREATE OR REPLACE FUNCTION keypal.config() RETURNS keypal.settings
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT s FROM keypal.settings s
    UNION ALL
    SELECT ROW(true, '', 32, 'A-Za-z0-9', 'sha256', '60 seconds'::interval, NULL::jsonb, NULL::jsonb,
               NULL::text, '5 seconds'::interval, 8, '10 seconds'::interval, 4, false,
               '{"events": "30d", "webhook_deliveries": "30d", "usage": "400d"}'::jsonb, now(), false, '[]'::jsonb)::keypal.settings
    LIMIT 1
$$;

-- keypal_configure gains an argument: it is replaced (grants made on the old one must be
-- made again: a grant made by this script would count as the extension's own, which pg_dump
-- leaves out).
DROP FUNCTION keypal_configure(text, integer, text, text, text, jsonb, jsonb, text, text, jsonb, text, integer, text, integer, boolean);
CREATE FUNCTION keypal_configure(prefix text DEFAULT NULL, length integer DEFAULT NULL,
                                 alphabet text DEFAULT NULL, algorithm text DEFAULT NULL,
                                 last_used_resolution text DEFAULT NULL, rate_limit jsonb DEFAULT NULL,
                                 environments jsonb DEFAULT NULL, default_env text DEFAULT NULL,
                                 audit_retention text DEFAULT NULL, retention jsonb DEFAULT NULL,
                                 webhook_timeout text DEFAULT NULL, webhook_max_attempts integer DEFAULT NULL,
                                 webhook_backoff text DEFAULT NULL, webhook_concurrency integer DEFAULT NULL,
                                 webhook_allow_private boolean DEFAULT NULL, checksum boolean DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    c keypal.settings := keypal.config();
    before keypal.settings := c;
BEGIN
    -- No argument: only read.
    IF num_nonnulls(prefix, length, alphabet, algorithm, last_used_resolution, rate_limit, environments,
                    default_env, audit_retention, retention, webhook_timeout, webhook_max_attempts,
                    webhook_backoff, webhook_concurrency, webhook_allow_private, checksum) = 0 THEN
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
            issued = EXCLUDED.issued,
            updated_at = EXCLUDED.updated_at;
    RETURN to_jsonb(c) - 'singleton';
END $$;

CREATE OR REPLACE FUNCTION keypal.note_shape(issued jsonb, length integer, alphabet text, checksum boolean)
RETURNS jsonb LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN issued @> jsonb_build_array(s) THEN issued ELSE issued || jsonb_build_array(s) END
      FROM jsonb_build_object('length', length, 'alphabet', alphabet, 'checksum', checksum) AS s
$$;

CREATE OR REPLACE FUNCTION keypal_key_pattern()
RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT keypal.key_regex(
               ARRAY[c.prefix] || coalesce((SELECT array_agg(coalesce(e.value->>'prefix', c.prefix))
                                              FROM jsonb_each(c.environments) e), '{}'),
               c.length, c.alphabet, c.checksum, c.issued)
      FROM keypal.config() c
$$;

-- Durations stored under 0.1.0 as bare numbers (read as seconds then) get their unit:
-- 0.2.0 refuses a duration without one, and maintenance and templates read these again.
UPDATE keypal.settings SET retention = (
    SELECT jsonb_object_agg(e.key, CASE WHEN jsonb_typeof(e.value) = 'string'
                                             AND e.value #>> '{}' ~ '^\s*[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)\s*$'
                                        THEN to_jsonb(trim(e.value #>> '{}') || 's') ELSE e.value END)
      FROM jsonb_each(retention) e)
 WHERE retention <> '{}';
UPDATE keypal.templates t SET options = t.options || (
    SELECT coalesce(jsonb_object_agg(e.key, to_jsonb(trim(e.value #>> '{}') || 's')), '{}')
      FROM jsonb_each(t.options) e
     WHERE e.key IN ('expires_in', 'notify_before') AND jsonb_typeof(e.value) = 'string'
       AND e.value #>> '{}' ~ '^\s*[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)\s*$');

CREATE OR REPLACE FUNCTION keypal.arm_timers()
RETURNS trigger LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    ins boolean := TG_OP = 'INSERT';
    which text;
    due timestamptz;
    armed boolean := false;
BEGIN
    -- Restoring a dump: the timers are restored alongside, as they were.
    IF ins AND coalesce(current_setting('keypal._actor', true), '') = '' AND keypal.copying_into(TG_RELID) THEN
        RETURN NULL;
    END IF;
    IF NEW.revoked_at <= now() THEN
        IF NOT ins THEN
            DELETE FROM keypal.key_timers t WHERE t.key_id = NEW.id;
        END IF;
        RETURN NULL;
    END IF;
    FOREACH which IN ARRAY ARRAY['disable', 'revoke', 'expiring', 'expired'] LOOP
        CONTINUE WHEN NOT ins AND keypal.timer_due(OLD, which) IS NOT DISTINCT FROM keypal.timer_due(NEW, which);
        due := keypal.timer_due(NEW, which);
        -- keypal_import: a moment that passed before the key came here was the source's
        -- to act on (its state says what came of it); only what is still ahead is armed.
        IF due <= now() AND current_setting('keypal._action', true) = 'imported' THEN
            due := NULL;
        END IF;
        IF due IS NULL THEN
            IF NOT ins THEN
                DELETE FROM keypal.key_timers t WHERE t.key_id = NEW.id AND t.kind = which;
            END IF;
        ELSE
            INSERT INTO keypal.key_timers AS t (key_id, kind, due_at) VALUES (NEW.id, which, due)
                ON CONFLICT (key_id, kind) DO UPDATE SET due_at = EXCLUDED.due_at;
            armed := true;
        END IF;
    END LOOP;
    -- The worker applies timers (when it runs maintenance): make sure one runs.
    IF armed AND current_setting('keypal.maintenance_interval', true) IS DISTINCT FROM '0' THEN
        PERFORM keypal.ensure_worker();
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION keypal.webhook_not_found(id bigint)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF id IS NULL THEN
        RAISE EXCEPTION 'invalid id: is required (a webhook''s id, as keypal_add_webhook returned it)'
            USING ERRCODE = '22023';
    END IF;
    RAISE EXCEPTION 'WEBHOOK_NOT_FOUND: no webhook with id %', coalesce(id::text, 'NULL')
        USING ERRCODE = 'P0002', DETAIL = 'WEBHOOK_NOT_FOUND';
END $$;

CREATE OR REPLACE FUNCTION keypal.parse_duration(value text, arg text, allow_zero boolean DEFAULT false)
RETURNS interval LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
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

CREATE OR REPLACE FUNCTION keypal.key_not_found(id uuid, what text DEFAULT 'id')
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF id IS NULL THEN
        RAISE EXCEPTION 'invalid %: is required', what USING ERRCODE = '22023',
            HINT = 'pass the key''s id (keypal_create and keypal_verify return it as id / key_id)';
    END IF;
    RAISE EXCEPTION 'KEY_NOT_FOUND: no API key with % %', what, coalesce(id::text, 'NULL')
        USING ERRCODE = 'P0002', DETAIL = 'KEY_NOT_FOUND';
END $$;

CREATE OR REPLACE FUNCTION keypal.check_env(env text, arg text, envs jsonb)
RETURNS void LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF env IS NOT NULL AND jsonb_typeof(envs) = 'object' AND NOT envs ? env THEN
        RAISE EXCEPTION 'invalid %: no environment named % (configured: %)', arg, quote_literal(env),
            (SELECT string_agg(e, ', ') FROM jsonb_object_keys(envs) e) USING ERRCODE = '22023';
    END IF;
END $$;

CREATE OR REPLACE FUNCTION keypal.create_key(opts jsonb, arg_prefix text DEFAULT '', extra jsonb DEFAULT '{}')
RETURNS keypal.created_key LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    o        jsonb := keypal.normalize_options(opts, arg_prefix, true);
    cfg      keypal.settings := keypal.config();
    v_env    text := coalesce(o->>'env', cfg.default_env);
    v_scopes text[] := keypal.text_array(o->'scopes');
    v_res    jsonb := coalesce(o->'resources', '{}');
    v_ips    text[] := keypal.text_array(o->'allowed_ips');
    v_exp    timestamptz;
    v_key    text;
    v_id     uuid := gen_random_uuid();
    v_secret text;
BEGIN
    PERFORM keypal.check_env(v_env, arg_prefix || 'env', cfg.environments);
    -- A signing key's secret (derived, never stored; 55000 without keypal.signing_secret).
    v_secret := CASE WHEN coalesce((o->>'signing')::boolean, false) THEN keypal.signing_secret_for(v_id) END;
    IF o ? 'expires_in' THEN
        v_exp := now() + keypal.parse_duration(o->>'expires_in', arg_prefix || 'expires_in');
    ELSE
        v_exp := keypal.parse_timestamp(o->>'expires_at', arg_prefix || 'expires_at');
    END IF;
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
    v_key := keypal.generate_key(coalesce(cfg.environments -> v_env ->> 'prefix', cfg.prefix),
                                 cfg.length, cfg.alphabet);
    IF cfg.checksum THEN
        v_key := v_key || keypal.key_checksum(v_key, cfg.alphabet);
    END IF;
    PERFORM keypal.begin_change(keypal.actor(o->>'actor'), extra->>'action', extra->'context');
    INSERT INTO keypal.keys (id, key_hash, algorithm, owner_id, org_id, env, name, description, scopes,
                             resources, tags, metadata, enabled, expires_at, parent_id, policy,
                             rate_limit, quota, allowed_ips, blocked_ips, allowed_regions,
                             blocked_regions, disable_at, revoke_at, notify_before, rotated_from, signing)
    VALUES (v_id, keypal.hash_key(v_key, cfg.algorithm), cfg.algorithm, o->>'owner_id', o->>'org_id',
            v_env, o->>'name', o->>'description', v_scopes, v_res, keypal.text_array(o->'tags'),
            coalesce(o->'metadata', '{}'), coalesce((o->>'enabled')::boolean, true), v_exp,
            (o->>'parent_id')::uuid, o->>'policy', o->'rate_limit',
            nullif(o->'quota', 'null'), v_ips, keypal.text_array(o->'blocked_ips'),
            keypal.text_array(o->'allowed_regions'), keypal.text_array(o->'blocked_regions'),
            keypal.parse_timestamp(o->>'disable_at', arg_prefix || 'disable_at'),
            keypal.parse_timestamp(o->>'revoke_at', arg_prefix || 'revoke_at'),
            keypal.parse_duration(o->>'notify_before', arg_prefix || 'notify_before'),
            (extra->>'rotated_from')::uuid, v_secret IS NOT NULL);
    PERFORM keypal.end_change();
    RETURN ROW(v_key, v_id, v_exp, v_env, v_secret)::keypal.created_key;
END $$;

CREATE OR REPLACE FUNCTION keypal_define_template(name text DEFAULT NULL, options jsonb DEFAULT NULL)
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

CREATE OR REPLACE FUNCTION keypal_usage(key_id uuid DEFAULT NULL)
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

CREATE OR REPLACE FUNCTION keypal_analyze(key_id uuid DEFAULT NULL)
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

CREATE OR REPLACE FUNCTION keypal.audit_key_change()
RETURNS trigger LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    act     text := nullif(current_setting('keypal._action', true), '');
    ctx     jsonb := coalesce(nullif(current_setting('keypal._context', true), '')::jsonb, '{}');
    who     text := keypal.actor(current_setting('keypal._actor', true));
    changes jsonb;
    r       keypal.keys;
BEGIN
    -- Restoring a dump (a COPY into keypal.keys, outside any keypal function): the rows bring
    -- their own audit history and events, restored alongside.
    IF TG_OP = 'INSERT' AND coalesce(current_setting('keypal._actor', true), '') = ''
       AND keypal.copying_into(TG_RELID) THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'INSERT' THEN
        r := NEW;
        act := coalesce(act, 'created');
    ELSIF TG_OP = 'DELETE' THEN
        r := OLD;
        act := 'deleted';
    ELSE
        r := NEW;
        changes := keypal.row_changes(to_jsonb(OLD), to_jsonb(NEW));
        IF changes = '{}' THEN
            RETURN NULL;
        END IF;
        act := CASE
            -- keypal_import's overwrite (not a cascade it set off, one trigger level down)
            WHEN act = 'imported' AND pg_trigger_depth() = 1 THEN 'imported'
            WHEN NEW.rotated_to IS NOT NULL AND OLD.rotated_to IS NULL THEN 'rotated'
            WHEN NEW.revoked_at IS NOT NULL AND (OLD.revoked_at IS NULL OR NEW.revoked_at < OLD.revoked_at) THEN 'revoked'
            WHEN NEW.enabled AND NOT OLD.enabled THEN 'enabled'
            WHEN OLD.enabled AND NOT NEW.enabled THEN 'disabled'
            ELSE 'updated' END;
        IF act = 'revoked' AND NEW.revoke_reason = 'parent revoked' THEN
            ctx := ctx || jsonb_build_object('cascade_from', NEW.parent_id);
        END IF;
    END IF;
    INSERT INTO keypal.audit_log (action, key_id, owner_id, org_id, actor, role, context, changes)
    VALUES (act, r.id, r.owner_id, r.org_id, who, session_user, ctx, changes);

    IF act IN ('created', 'updated', 'enabled', 'disabled', 'revoked', 'rotated') THEN
        PERFORM keypal.emit_event('key.' || act, r.id, jsonb_strip_nulls(jsonb_build_object(
            'keyId', r.id, 'ownerId', r.owner_id, 'orgId', r.org_id, 'env', r.env, 'name', r.name,
            'revokedBy', CASE WHEN act = 'revoked' THEN r.revoked_by END,
            'reason', CASE WHEN act = 'revoked' THEN r.revoke_reason END,
            'rotatedTo', CASE WHEN act = 'rotated' THEN r.rotated_to END,
            'actor', who)));
    END IF;
    RETURN NULL;
END $$;

-- One key as an export record: every column (key_hash as lower-case hex, last_used_at as
-- of now); a column that is NULL is left out. keypal_import reads it back.
CREATE FUNCTION keypal.export_record(k keypal.keys, last_used timestamptz)
RETURNS jsonb LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN (SELECT jsonb_object_agg(e.key, e.value)
              FROM jsonb_each(to_jsonb(k) - 'key_hash' - 'last_used_at') AS e
             WHERE e.value <> 'null')
        || jsonb_build_object('key_hash', encode(k.key_hash, 'hex'))
        -- a rate_limit of JSON null (no limit, over any default) is a setting, not "none"
        || CASE WHEN k.rate_limit = 'null' THEN '{"rate_limit": null}'::jsonb ELSE '{}'::jsonb END
        || CASE WHEN last_used IS NULL THEN '{}' ELSE jsonb_build_object('last_used_at', last_used) END;
END $$;

CREATE FUNCTION keypal_export_records(owner_id text DEFAULT NULL, org_id text DEFAULT NULL)
RETURNS SETOF jsonb
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN QUERY
    SELECT keypal.export_record(k, i.last_used_at)
      FROM keypal.keys k JOIN keypal.key_info i ON i.id = k.id
     WHERE (keypal_export_records.owner_id IS NULL OR k.owner_id = keypal_export_records.owner_id)
       AND (keypal_export_records.org_id IS NULL OR k.org_id = keypal_export_records.org_id)
     ORDER BY k.created_at, k.id;   -- a parent or a rotation's old key before the key it made
END $$;

CREATE FUNCTION keypal_export(owner_id text DEFAULT NULL, org_id text DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN (SELECT coalesce(jsonb_agg(r), '[]')
              FROM @extschema@.keypal_export_records(keypal_export.owner_id, keypal_export.org_id) AS r);
END $$;

CREATE FUNCTION keypal_import(data jsonb DEFAULT NULL, on_conflict text DEFAULT 'error', actor text DEFAULT NULL)
RETURNS TABLE (imported bigint, skipped bigint, overwritten bigint)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
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

COMMENT ON FUNCTION keypal_export(text, text) IS 'Every key of an owner and/or org (NULL: all) as a JSON array of records: each key''s settings, state, links and hash (key_hash as hex; never a plaintext). keypal_import reads it back.';
COMMENT ON FUNCTION keypal_export_records(text, text) IS 'keypal_export one record per row, for exports too large for one jsonb value (COPY (SELECT ...) TO ...).';
COMMENT ON FUNCTION keypal_import(jsonb, text, text) IS 'Imports key records (keypal_export''s, or the TypeScript keypal''s {id, keyHash, metadata}) in one transaction: all checked first (a bad one raises naming data[i].field; nothing is written), then written and audited as imported. on_conflict: error (default), skip or overwrite (never un-revokes). Returns imported, skipped, overwritten.';
COMMENT ON FUNCTION keypal_key_pattern() IS 'A regular expression matching the keys this database issues (its prefixes, the random part and checksum in its alphabet), for secret scanners (gitleaks, GitHub secret scanning). Not anchored.';
COMMENT ON FUNCTION keypal_configure(text, integer, text, text, text, jsonb, jsonb, text, text, jsonb, text, integer, text, integer, boolean, boolean) IS 'Changes keypal''s settings (prefix, length, alphabet, algorithm, last_used_resolution, rate_limit, environments, default_env, retention (what keypal_run_maintenance prunes: {"events": "30d", "webhook_deliveries": "30d", "usage": "400d", "audit_log": ...}), audit_retention, webhook_timeout, webhook_max_attempts, webhook_backoff, webhook_concurrency, webhook_allow_private, checksum (new keys end in a checksum verify checks without a lookup)); NULL leaves a setting, JSON null clears it; no argument only reads. Returns all settings as jsonb.';

-- Management only (SPEC §6): PUBLIC runs none of them.
REVOKE ALL ON FUNCTION keypal.import_record(text, integer), keypal.export_record(keypal.keys, timestamptz),
    keypal.check_env(text, text, jsonb), keypal_export(text, text), keypal_export_records(text, text),
    keypal_import(jsonb, text, text), keypal.key_checksum(text, text), keypal.key_regex(text[], integer, text, boolean, jsonb),
    keypal.note_shape(jsonb, integer, text, boolean),
    keypal_key_pattern(), keypal_configure(text, integer, text, text, text, jsonb, jsonb, text, text, jsonb, text, integer, text, integer, boolean, boolean)
    FROM PUBLIC;
