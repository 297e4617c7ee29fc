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
-- - keypal_import called from a trigger (an import queue's): its overwrites are audited as
--   imported, with no event, as when called directly (keypal.begin_change notes the trigger
--   depth it runs at, keypal.audit_updated_keys compares with it; it assumed depth 0).
-- - Two keypal_configure calls at once: the second waits for the first and applies its own
--   arguments on top of what the first committed (it wrote back the settings it had read
--   before, undoing the first's change and the record of the key shape it made keys in).
--   In REPEATABLE READ the second fails with 40001, as before. keypal_import takes the same
--   lock before it notes imported keys in the settings.
-- - keypal_import: an overwrite that moves a key under another parent is refused when its
--   deepest descendant would be past the hierarchy's cap (verify would refuse that key for
--   good); keypal.height_below (new) measures them.
-- - keypal_import: a disable_at or revoke_at already past, not applied at the source (the
--   record is neither disabled nor revoked), is armed here, not dropped (an overwrite that
--   moved revoke_at into the past deleted the key's timer; the key was refused by verify
--   but never written down as revoked, audited or announced): keypal.timer_to_arm.

CREATE OR REPLACE FUNCTION keypal.begin_change(actor text, action text DEFAULT NULL, context jsonb DEFAULT NULL)
RETURNS void LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM set_config('keypal._actor', coalesce(actor, ''), true),
            set_config('keypal._action', coalesce(action, ''), true),
            set_config('keypal._context', coalesce(context::text, ''), true),
            set_config('keypal._depth', pg_trigger_depth()::text, true);
END $$;

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

CREATE OR REPLACE FUNCTION keypal.audit_updated_keys()
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
REVOKE ALL ON FUNCTION keypal.height_below(uuid) FROM PUBLIC;

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
    -- (an overwritten key brings its descendants along under its new parent: the deepest of
    -- them must be within the cap too, or verify would refuse it for good)
    SELECT t.n INTO bad FROM pg_temp."keypal import" t
     WHERE t.act <> 's' AND t.parent_id IS NOT NULL
       AND keypal.depth_of(t.id) + CASE WHEN t.act = 'o' THEN keypal.height_below(t.id) ELSE 0 END
           > keypal.max_hierarchy_depth()
     ORDER BY t.n LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'invalid data[%].parent_id: a key hierarchy is at most % levels deep, and has no cycles',
            bad.n, keypal.max_hierarchy_depth() USING ERRCODE = '22023';
    END IF;

    -- Keys of shapes nobody recorded are here now: verify stops refusing keys unlooked by
    -- their checksum (it looks every key up; a wrong checksum is then INVALID_FORMAT).
    IF n_new + n_over > 0 THEN
        -- (the lock keypal_configure takes before it reads the settings: writers of them queue
        -- on it, not on the row, so this transaction may still configure after it)
        LOCK TABLE keypal.settings IN SHARE ROW EXCLUSIVE MODE;
        INSERT INTO keypal.settings AS s (singleton, issued) VALUES (true, '[{"imported": true}]')
            ON CONFLICT (singleton) DO UPDATE
            SET issued = CASE WHEN s.issued @> '[{"imported": true}]' THEN s.issued
                              ELSE s.issued || '[{"imported": true}]' END;
    END IF;
    PERFORM keypal.end_change();
    DROP TABLE pg_temp."keypal import";
    RETURN QUERY SELECT n_new, n_all - n_new - n_over, n_over;
END $$;

CREATE OR REPLACE FUNCTION keypal.timer_to_arm(k keypal.keys, kind text, importing boolean)
RETURNS timestamptz LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN k.revoked_at <= now() THEN NULL
                WHEN importing AND kind IN ('expiring', 'expired') AND keypal.timer_due(k, kind) <= now() THEN NULL
                ELSE keypal.timer_due(k, kind) END
$$;
