-- Creates the database and roles the contract suite runs against (committed data).
DROP DATABASE IF EXISTS keypal_test WITH (FORCE);  -- the flush worker may be connected
CREATE DATABASE keypal_test;
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'keypal_plain') THEN
        CREATE ROLE keypal_plain LOGIN;          -- granted nothing: verify family only
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'keypal_admin') THEN
        CREATE ROLE keypal_admin LOGIN;          -- granted the management functions
    END IF;
END $$;
\c keypal_test
CREATE EXTENSION pgtap;
CREATE EXTENSION keypal;
CREATE EXTENSION pgcrypto;
-- tap.err(sql): 'SQLSTATE DETAIL HINT' of the error sql raises, or 'no error'.
CREATE SCHEMA tap;
CREATE FUNCTION tap.err(sql text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE st text; det text; hint text;
BEGIN
    EXECUTE sql;
    RETURN 'no error';
EXCEPTION WHEN others THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, det = PG_EXCEPTION_DETAIL, hint = PG_EXCEPTION_HINT;
    RETURN rtrim(st || ' ' || coalesce(det, '') || ' ' || coalesce(hint, ''));
END $$;
