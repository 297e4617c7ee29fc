\set n 100001
SELECT keypal_verify('k' || lpad(:n::text, 31, '0'), 'read');
