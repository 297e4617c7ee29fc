-- A five-minute tour of keypal. Run by scripts/try.sh; every statement is plain SQL.

-- Keys start with sk_ from now on.
SELECT keypal_configure(prefix => 'sk_');

-- Create a key that can read. The plaintext is shown once; only its hash is stored.
SELECT key, id, expires_at FROM keypal_create(owner_id => 'user_123', name => 'demo key',
                                              scopes => '{read}', expires_in => '30d') \gset

-- Verify it: with the right scope, and without.
SELECT valid, owner_id, scopes FROM keypal_verify(:'key', scope => 'read');
SELECT valid, error_code, error FROM keypal_verify(:'key', scope => 'write');

-- Rotate it: a new key with the same settings; the old one keeps working for 1 hour.
SELECT key AS new_key, id AS new_id, old_id FROM keypal_rotate(:'id', grace => '1h') \gset
SELECT valid FROM keypal_verify(:'new_key', 'read');

-- Revoke the new key: it stops verifying at once.
SELECT keypal_revoke(:'new_id', reason => 'demo over');
SELECT valid, error_code FROM keypal_verify(:'new_key', 'read');

-- Everything that happened, newest first.
SELECT at, action, key_id, actor FROM keypal_audit(owner_id => 'user_123');
