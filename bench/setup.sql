-- 1 100 000 keys with known plaintexts 'k' || lpad(n, 31, '0') (the default format: 32
-- characters of A-Za-z0-9), loaded straight into keypal.keys with the hash keypal uses
-- (no salt: sha256(key)): keys 1..1 000 000 plain, keys 1 000 001..1 100 000 with a (never
-- reached) monthly quota; and all of them again in a plain table for the inline baseline.
CREATE EXTENSION IF NOT EXISTS keypal;
CREATE EXTENSION IF NOT EXISTS pgcrypto;
SET session_replication_role = replica;   -- skip audit triggers for the bulk load
INSERT INTO keypal.keys (key_hash, algorithm, owner_id, scopes, quota)
SELECT digest('k' || lpad(n::text, 31, '0'), 'sha256'), 'sha256', 'bench_' || (n % 1000), '{read,write}',
       CASE WHEN n > 1000000 THEN '{"limit": 1000000000000, "period": "month", "on_exceeded": "block"}'::jsonb END
  FROM generate_series(1, 1100000) n;
RESET session_replication_role;
-- The inline baseline's table holds the same 1 100 000 keys (its lookups, like verify's,
-- land in an index of that size).
CREATE TABLE bench_inline AS
SELECT k.id, k.key_hash, k.owner_id, k.scopes, k.enabled, k.revoked_at, k.expires_at
  FROM keypal.keys k;
CREATE UNIQUE INDEX ON bench_inline (key_hash);
VACUUM ANALYZE keypal.keys;
VACUUM ANALYZE bench_inline;
-- Steady state: every key used once, so last_used_at is fresh for the whole run (and, with
-- a quota, its use is loaded and counted).
SELECT keypal_configure(last_used_resolution => '1h');
SELECT count(*) FILTER (WHERE v.valid) AS warmed
  FROM generate_series(1, 1100000) n, LATERAL keypal_verify('k' || lpad(n::text, 31, '0'), 'read') v;
