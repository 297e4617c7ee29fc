\set n random(1, 1000000)
SELECT keypal_verify('k' || lpad(:n::text, 31, '0'), 'read');
