-- The database the client tests (Node and Python) run against:
--   psql -v db=keypal_clients -f clients/setup.sql
-- keypal_web is what a web server connects as: granted nothing, so it can run only the
-- verify family (SPEC §6). keypal_manager is granted the management functions the clients call.
SET client_min_messages = warning;
-- It drops the database it is given: only a keypal_* test database.
SELECT :'db' LIKE 'keypal\_%' AS db_ok \gset
\if :db_ok
\else
    DO $$ BEGIN RAISE EXCEPTION 'clients/setup.sql: the database must be named keypal_* (it is dropped and made again)'; END $$;
\endif
DROP DATABASE IF EXISTS :"db" WITH (FORCE);
CREATE DATABASE :"db";
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'keypal_web') THEN CREATE ROLE keypal_web LOGIN; END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'keypal_manager') THEN CREATE ROLE keypal_manager LOGIN; END IF;
END $$;
\c :"db"
CREATE EXTENSION keypal;
GRANT EXECUTE ON FUNCTION keypal_create, keypal_create_many, keypal_get(uuid), keypal_list, keypal_revoke,
    keypal_revoke_many, keypal_rotate, keypal_update, keypal_enable, keypal_disable, keypal_usage
    TO keypal_manager;
