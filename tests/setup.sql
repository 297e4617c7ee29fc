-- Creates the database and roles the contract suite runs against (committed data).
DROP DATABASE IF EXISTS keypal_test;
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
