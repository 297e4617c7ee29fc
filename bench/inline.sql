\set n random(1, 100000)
SELECT id, owner_id, scopes FROM bench_inline
 WHERE key_hash = digest('k' || lpad(:n::text, 31, '0'), 'sha256')
   AND enabled AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now())
   AND 'read' = ANY (scopes);
