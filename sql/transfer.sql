-- keypal: moving keys between databases and from the TypeScript keypal — keypal_export and
-- keypal_import. Records carry a key's hash, never its plaintext.
--
-- Loaded before api.sql (which the final comments and grants are part of). Its functions are
-- PL/pgSQL: they call api.sql's helpers only when they run.

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

-- One record of keypal_import's data, checked, as a keypal.keys row (src/import_row.rs).
CREATE FUNCTION keypal.import_row(rec text, index integer,
    OUT source text, OUT notify text, OUT limits jsonb, OUT k keypal.keys)
RETURNS record LANGUAGE c STRICT STABLE PARALLEL SAFE AS 'MODULE_PATHNAME', 'keypal_import_row';
COMMENT ON FUNCTION keypal.import_row(text, integer) IS
    'keypal_import: one record checked (errors name data[index].field) and made a keypal.keys row, with its kind (keypal or typescript), its notify_before as written and its rate_limit (a JSON null kept).';

CREATE FUNCTION keypal_import(data jsonb DEFAULT NULL, on_conflict text DEFAULT 'error', actor text DEFAULT NULL)
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
