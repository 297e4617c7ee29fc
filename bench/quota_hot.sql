\set n 1000001
SELECT keypal_verify('k' || lpad(:n::text, 31, '0'), 'read');
