-- keypal: schema, types and tables. Loaded first (bootstrap) by CREATE EXTENSION.
-- Data lives in schema keypal; functions live in the extension's schema.

CREATE SCHEMA IF NOT EXISTS keypal;
REVOKE ALL ON SCHEMA keypal FROM PUBLIC;
-- The verify family returns keypal.verify_result, so every role may use the schema's types;
-- its tables stay closed (no table grants to PUBLIC).
GRANT USAGE ON SCHEMA keypal TO PUBLIC;

CREATE TYPE keypal.verify_result AS (
    valid                boolean,
    error_code           text,
    error                text,
    key_id               uuid,
    owner_id             text,
    org_id               text,
    env                  text,
    name                 text,
    scopes               text[],
    resources            jsonb,
    tags                 text[],
    metadata             jsonb,
    expires_at           timestamptz,
    rate_limited         boolean,
    retry_after_ms       bigint,
    rate_limit_remaining bigint,
    quota_remaining      bigint
);
COMMENT ON TYPE keypal.verify_result IS
    'What keypal_verify answers: valid, or why not (error_code, error), and the key''s public identity.';

-- One row: the settings keypal_configure changes. The salt is not here: it is the
-- superuser-only setting keypal.salt, so pg_dump never writes it.
CREATE TABLE keypal.settings (
    singleton            boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    prefix               text NOT NULL DEFAULT '',
    length               integer NOT NULL DEFAULT 32,
    alphabet             text NOT NULL DEFAULT 'A-Za-z0-9',
    algorithm            text NOT NULL DEFAULT 'sha256' CHECK (algorithm IN ('sha256', 'sha512')),
    last_used_resolution interval NOT NULL DEFAULT '60 seconds',
    rate_limit           jsonb,
    environments         jsonb,
    default_env          text,
    -- Webhook delivery (the flush worker): per-request timeout, attempts before a delivery
    -- is dead, the first retry's delay (doubled per attempt, with jitter), deliveries in
    -- flight per webhook, and whether loopback/private/link-local targets may be reached.
    webhook_timeout       interval NOT NULL DEFAULT '5 seconds',
    webhook_max_attempts  integer NOT NULL DEFAULT 8,
    webhook_backoff       interval NOT NULL DEFAULT '10 seconds',
    webhook_concurrency   integer NOT NULL DEFAULT 4,
    webhook_allow_private boolean NOT NULL DEFAULT false,
    -- What keypal_run_maintenance prunes: table -> age ("events", "webhook_deliveries",
    -- "usage", "audit_log"); a table not named is kept.
    retention            jsonb NOT NULL DEFAULT '{"events": "30d", "webhook_deliveries": "30d", "usage": "400d"}',
    updated_at           timestamptz NOT NULL DEFAULT now(),
    -- New keys end in a checksum of the rest (CRC-32 in the key's alphabet): verify refuses a
    -- mistyped key without a lookup. (Last: added in 0.2.0, after updated_at on every install.)
    checksum             boolean NOT NULL DEFAULT false,
    -- The shapes keys have been issued in ({"length", "alphabet", "checksum"}, and
    -- {"imported": true} once keys came in whose shapes nobody knows): verify refuses a key
    -- without a lookup only when it can be none of them.
    issued               jsonb NOT NULL DEFAULT '[]',
    -- keypal_configure(limit_split => n): each of n servers (a primary and its standbys)
    -- enforces its share of every rate limit and quota, counting only its own traffic: a
    -- standby floor(limit / n), the primary the rest. 1: one server's whole limit. (Added in
    -- 0.4.0, last.)
    limit_split          integer NOT NULL DEFAULT 1 CHECK (limit_split BETWEEN 1 AND 1000)
);
-- No row until keypal_configure() first writes one (so pg_dump's copy of the row restores
-- cleanly); keypal.config() answers the defaults until then.
COMMENT ON TABLE keypal.settings IS 'keypal settings (at most one row), changed with keypal_configure().';

CREATE FUNCTION keypal.config() RETURNS keypal.settings
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
COMMENT ON FUNCTION keypal.config() IS 'The settings row, or the defaults while none has been written.';

CREATE TABLE keypal.policies (
    name          text PRIMARY KEY,
    scopes        text[],
    resources     jsonb,
    rate_limit    jsonb,
    max_ttl       interval,
    require_ip    boolean NOT NULL DEFAULT false,
    max_resources integer,
    created_at    timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE keypal.policies IS 'Named key policies (keypal_define_policy), enforced by keypal_create(policy => ...).';

CREATE TABLE keypal.templates (
    name       text PRIMARY KEY,
    options    jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE keypal.templates IS 'Named option sets for keypal_create_from_template().';

CREATE TABLE keypal.keys (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    key_hash         bytea NOT NULL UNIQUE,
    algorithm        text NOT NULL,
    owner_id         text NOT NULL,
    org_id           text,
    env              text,
    name             text,
    description      text,
    scopes           text[] NOT NULL DEFAULT '{}',
    resources        jsonb NOT NULL DEFAULT '{}',
    tags             text[] NOT NULL DEFAULT '{}',
    metadata         jsonb NOT NULL DEFAULT '{}',
    enabled          boolean NOT NULL DEFAULT true,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    expires_at       timestamptz,
    last_used_at     timestamptz,   -- as imported or restored; keypal writes keypal.key_usage
    -- revoked_at may lie in the future: a rotated key's grace period ends then.
    revoked_at       timestamptz,
    revoke_reason    text,
    revoked_by       text,
    rotated_from     uuid REFERENCES keypal.keys (id) ON DELETE SET NULL,
    rotated_to       uuid REFERENCES keypal.keys (id) ON DELETE SET NULL,
    parent_id        uuid REFERENCES keypal.keys (id) ON DELETE RESTRICT,
    policy           text REFERENCES keypal.policies (name) ON UPDATE CASCADE,
    rate_limit       jsonb,
    quota            jsonb,
    allowed_ips      text[] NOT NULL DEFAULT '{}',
    blocked_ips      text[] NOT NULL DEFAULT '{}',
    allowed_regions  text[] NOT NULL DEFAULT '{}',
    blocked_regions  text[] NOT NULL DEFAULT '{}',
    disable_at       timestamptz,
    revoke_at        timestamptz,
    notify_before    interval,
    -- Requests may be signed with this key's signing secret (derived from the server's
    -- keypal.signing_secret and the id: no table holds it).
    signing          boolean NOT NULL DEFAULT false
    -- (its one CHECK, keypal.key_row_ok: a known algorithm, not its own parent, resources
    -- and metadata objects, is added in api.sql, once the function exists)
);
CREATE INDEX keys_owner_idx ON keypal.keys (owner_id, created_at);
CREATE INDEX keys_org_idx ON keypal.keys (org_id, created_at) WHERE org_id IS NOT NULL;
CREATE INDEX keys_parent_idx ON keypal.keys (parent_id) WHERE parent_id IS NOT NULL;
CREATE INDEX keys_tags_idx ON keypal.keys USING gin (tags);
COMMENT ON TABLE keypal.keys IS 'API keys: one row per key, holding its hash (never the plaintext) and its settings.';

-- When each key was last used: written behind by the flush worker (what verify recorded in
-- shared memory), at most once per last_used_resolution per key. Kept apart from
-- keypal.keys so that these writes neither churn the table and indexes verify reads nor
-- conflict with transactions that change keys.
CREATE TABLE keypal.key_usage (
    key_id       uuid PRIMARY KEY REFERENCES keypal.keys (id) ON DELETE CASCADE,
    last_used_at timestamptz NOT NULL
) WITH (fillfactor = 50);   -- room on each page for HOT updates by the flush worker
COMMENT ON TABLE keypal.key_usage IS 'When each key was last used, as the flush worker last wrote it (keypal.key_info adds what is not yet written).';

-- Quota use in the current period, per key: written by keypal_track_usage and by the
-- flush worker (what verify counted in shared memory). The worker also keeps the current
-- hour's verified requests here (hour, hour_requests: one row to update per key and flush)
-- and moves an hour that is over to keypal.usage; keypal.hourly_usage shows both.
CREATE TABLE keypal.quota_usage (
    key_id        uuid PRIMARY KEY REFERENCES keypal.keys (id) ON DELETE CASCADE,
    period_start  timestamptz NOT NULL,
    used          bigint NOT NULL DEFAULT 0,
    hour          timestamptz,
    hour_requests bigint NOT NULL DEFAULT 0,
    -- When period_start's period ends (set by trigger from the key's quota period), for
    -- keypal_run_maintenance to reset rows whose period rolled over.
    resets_at     timestamptz
) WITH (fillfactor = 50);   -- room on each page for HOT updates by the flush worker
CREATE INDEX quota_usage_resets_idx ON keypal.quota_usage (resets_at);
COMMENT ON TABLE keypal.quota_usage IS 'Requests counted against each key''s quota in its current period, and the current hour''s verified requests (keypal_usage and keypal.hourly_usage add what is not yet written).';

-- Usage per key, hour and endpoint (keypal_track_usage), for analytics.
CREATE TABLE keypal.usage (
    key_id   uuid NOT NULL REFERENCES keypal.keys (id) ON DELETE CASCADE,
    hour     timestamptz NOT NULL,
    endpoint text NOT NULL DEFAULT '',
    requests bigint NOT NULL DEFAULT 0,
    tokens   bigint NOT NULL DEFAULT 0,
    cost     numeric NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, hour, endpoint)
) WITH (fillfactor = 70);   -- the current hour's rows are updated in place (HOT)
CREATE INDEX usage_hour_idx ON keypal.usage (hour);   -- pruning by age
COMMENT ON TABLE keypal.usage IS 'Usage per key, hour and endpoint, recorded by keypal_track_usage() and, behind verify, by the flush worker (for keys with a quota).';

-- The last batch of counts taken from each standby's worker (keypal.replica_counts): a
-- batch sent again, its answer lost, is answered and not counted twice.
CREATE TABLE keypal.replica_batches (
    replica text PRIMARY KEY,
    batch   bigint NOT NULL,
    at      timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE keypal.replica_batches IS 'The last batch number keypal.replica_counts took from each standby worker (rows unheard of for a week are dropped).';

CREATE TABLE keypal.audit_log (
    id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    action   text NOT NULL,
    key_id   uuid,
    owner_id text,
    org_id   text,
    actor    text,
    -- The database role that made the change (session_user: the login role, or the role
    -- SET SESSION AUTHORIZATION chose), whatever actor claims.
    role     text NOT NULL DEFAULT session_user,
    context  jsonb NOT NULL DEFAULT '{}',
    changes  jsonb
);
CREATE INDEX audit_log_key_idx ON keypal.audit_log (key_id, at);
CREATE INDEX audit_log_owner_idx ON keypal.audit_log (owner_id, at);
CREATE INDEX audit_log_at_idx ON keypal.audit_log (at);
COMMENT ON TABLE keypal.audit_log IS 'Append-only log of every change to a key, written by trigger.';

CREATE TABLE keypal.events (
    id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    event   text NOT NULL,
    key_id  uuid,
    payload jsonb NOT NULL
);
CREATE INDEX events_at_idx ON keypal.events (at);
COMMENT ON TABLE keypal.events IS 'Outbox of key events (payload = webhook body); NOTIFY keypal_events carries the id.';

-- Webhooks: where events are POSTed (keypal_add_webhook). The secret signs each delivery
-- and is write-only: no keypal function or view returns it.
CREATE TABLE keypal.webhooks (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    url        text NOT NULL,
    secret     text NOT NULL,
    events     text[] NOT NULL,   -- event names, or '*' for every event
    enabled    boolean NOT NULL DEFAULT true,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE keypal.webhooks IS 'Webhook endpoints events are delivered to (keypal_add_webhook); the secret column is write-only for keypal''s functions.';

-- Deliveries not yet done: one row per (webhook, event), written with the event in the
-- same transaction, claimed by the flush worker with FOR UPDATE SKIP LOCKED, deleted once
-- a 2xx answer came back; dead_at once the attempts are used up (keypal_redeliver).
-- next_at: when it may be tried (a retry's backoff, or the end of a claim's lease).
CREATE TABLE keypal.webhook_queue (
    webhook_id   bigint NOT NULL REFERENCES keypal.webhooks (id) ON DELETE CASCADE,
    event_id     bigint NOT NULL REFERENCES keypal.events (id) ON DELETE CASCADE,
    key_id       uuid,
    attempts     integer NOT NULL DEFAULT 0,
    next_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    leased_until timestamptz,
    dead_at      timestamptz,
    PRIMARY KEY (webhook_id, event_id)
);
CREATE INDEX webhook_queue_due_idx ON keypal.webhook_queue (webhook_id, next_at, event_id) WHERE dead_at IS NULL;
CREATE INDEX webhook_queue_key_idx ON keypal.webhook_queue (webhook_id, key_id, event_id) WHERE dead_at IS NULL;
CREATE INDEX webhook_queue_event_idx ON keypal.webhook_queue (event_id);
COMMENT ON TABLE keypal.webhook_queue IS 'Webhook deliveries pending (or dead: dead_at set), one per webhook and event.';

-- Every delivery attempt, as it ended.
CREATE TABLE keypal.webhook_deliveries (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id    bigint NOT NULL REFERENCES keypal.events (id) ON DELETE CASCADE,
    webhook_id  bigint NOT NULL REFERENCES keypal.webhooks (id) ON DELETE CASCADE,
    attempt     integer NOT NULL,
    status_code integer,   -- NULL: no answer (the error says why)
    error       text,
    at          timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX webhook_deliveries_event_idx ON keypal.webhook_deliveries (event_id);
CREATE INDEX webhook_deliveries_webhook_idx ON keypal.webhook_deliveries (webhook_id, at);
CREATE INDEX webhook_deliveries_at_idx ON keypal.webhook_deliveries (at);
COMMENT ON TABLE keypal.webhook_deliveries IS 'One row per webhook delivery attempt: its HTTP status, or the error.';

-- Schedules to apply, one row per key and kind, kept by trigger from the key's columns:
-- disable (disable_at), revoke (revoke_at), expiring (expires_at - notify_before), expired
-- (expires_at). keypal_run_maintenance takes the due ones (a row fires once, and is armed
-- again only when its columns change).
CREATE TABLE keypal.key_timers (
    key_id uuid NOT NULL REFERENCES keypal.keys (id) ON DELETE CASCADE,
    kind   text NOT NULL CHECK (kind IN ('disable', 'revoke', 'expiring', 'expired')),
    due_at timestamptz NOT NULL,
    PRIMARY KEY (key_id, kind)
);
CREATE INDEX key_timers_due_idx ON keypal.key_timers (due_at);
COMMENT ON TABLE keypal.key_timers IS 'Per key, the schedules keypal_run_maintenance has yet to apply (disable_at, revoke_at, notify_before, expiry).';

SELECT pg_catalog.pg_extension_config_dump('keypal.keys', '');
SELECT pg_catalog.pg_extension_config_dump('keypal.settings', '');
SELECT pg_catalog.pg_extension_config_dump('keypal.policies', '');
SELECT pg_catalog.pg_extension_config_dump('keypal.templates', '');
SELECT pg_catalog.pg_extension_config_dump('keypal.audit_log', '');
SELECT pg_catalog.pg_extension_config_dump('keypal.events', '');
-- Their id sequences too, so rows written after a restore do not reuse restored ids.
SELECT pg_catalog.pg_extension_config_dump('keypal.audit_log_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('keypal.events_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('keypal.quota_usage', '');
SELECT pg_catalog.pg_extension_config_dump('keypal.key_usage', '');
SELECT pg_catalog.pg_extension_config_dump('keypal.usage', '');
SELECT pg_catalog.pg_extension_config_dump('keypal.webhooks', '');
SELECT pg_catalog.pg_extension_config_dump('keypal.webhooks_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('keypal.webhook_queue', '');
SELECT pg_catalog.pg_extension_config_dump('keypal.webhook_deliveries', '');
SELECT pg_catalog.pg_extension_config_dump('keypal.webhook_deliveries_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('keypal.key_timers', '');
