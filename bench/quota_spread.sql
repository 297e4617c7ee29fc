\set n random(1000001, 1100000)
SELECT keypal_verify('k' || lpad(:n::text, 31, '0'), 'read');
