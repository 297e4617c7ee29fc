\set n 1
SELECT * FROM keypal_verify('k' || lpad(:n::text, 31, '0'), 'read');
