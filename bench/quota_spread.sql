\set n random(100001, 200000)
SELECT keypal_verify('k' || lpad(:n::text, 31, '0'), 'read');
