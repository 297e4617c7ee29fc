\set n random(1, 100000)
SELECT md5('k' || lpad(:n::text, 31, '0'));
