#!/usr/bin/env bash
# The flush worker runs as the bootstrap superuser. A database owner who is not a superuser
# sets the database's search_path to a schema of theirs holding now(), date_trunc() and an
# operator that would make them superuser when run by one. The worker must never call
# them: it pins search_path = pg_catalog, pg_temp in every transaction and qualifies
# everything.
source "$(dirname "$0")/lib.sh"
# This test's own sessions must not resolve names through the owner's search_path either.
export PGOPTIONS="-c search_path=pg_catalog,public -c default_transaction_read_only=off -c statement_timeout=0 -c lock_timeout=0 -c session_authorization=postgres -c role=none -c exit_on_error=off"

cleanup() {
    q -d postgres -c "ALTER DATABASE keypal_test RESET ALL" -c "ALTER DATABASE keypal_test OWNER TO postgres" >/dev/null 2>&1 || true
    q -c "DROP SCHEMA IF EXISTS evil CASCADE" >/dev/null 2>&1 || true
    q -d postgres -c "DROP ROLE IF EXISTS keypal_evil" >/dev/null 2>&1 || true
}
trap cleanup EXIT
cleanup
q -d postgres -c "CREATE ROLE keypal_evil LOGIN" -c "ALTER DATABASE keypal_test OWNER TO keypal_evil" >/dev/null
is "$(q -c "SELECT rolsuper FROM pg_roles WHERE rolname = 'keypal_evil'")" f "the database owner is not a superuser"

# The owner's trap: each function records who ran it and, run by a superuser, promotes them.
PGOPTIONS="-c search_path=pg_catalog,public" q -U keypal_evil >/dev/null <<'SQL'
CREATE SCHEMA evil;
CREATE TABLE evil.calls (fn text, by_role text, at timestamptz DEFAULT pg_catalog.clock_timestamp());
GRANT INSERT ON evil.calls TO PUBLIC;
CREATE FUNCTION evil.pwn(fn text) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO evil.calls (fn, by_role) VALUES (fn, pg_catalog.current_user());
    IF pg_catalog.current_setting('is_superuser') = 'on' THEN
        EXECUTE 'ALTER ROLE keypal_evil SUPERUSER';
    END IF;
END $$;
CREATE FUNCTION evil.now() RETURNS timestamptz LANGUAGE plpgsql AS $$
BEGIN PERFORM evil.pwn('now'); RETURN pg_catalog.now(); END $$;
CREATE FUNCTION evil.date_trunc(text, timestamptz) RETURNS timestamptz LANGUAGE plpgsql AS $$
BEGIN PERFORM evil.pwn('date_trunc'); RETURN pg_catalog.date_trunc($1, $2); END $$;
CREATE FUNCTION evil.uuid_eq(uuid, uuid) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN PERFORM evil.pwn('='); RETURN pg_catalog.uuid_eq($1, $2); END $$;
CREATE OPERATOR evil.= (LEFTARG = uuid, RIGHTARG = uuid, FUNCTION = evil.uuid_eq);
GRANT USAGE ON SCHEMA evil TO PUBLIC;
ALTER DATABASE keypal_test SET search_path = evil, pg_catalog;
SQL

# reconnect_and_flush WHAT: makes the worker reconnect (it reads the database's settings
# when it connects), gives it counts to flush and checks they were written.
reconnect_and_flush() {
    local since kid key
    since=$(q -c "SELECT clock_timestamp()")
    q -c "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE backend_type = 'keypal flush worker'" >/dev/null
    wait_for "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'keypal flush worker'" 0 >/dev/null
    # The next verify that records something starts a new worker.
    read -r kid key < <(q -F ' ' -c "SELECT id, key FROM keypal_create(owner_id => 'evil', quota => '{\"limit\": 1000}')")
    for _ in $(seq 10); do echo "SELECT (keypal_verify('$key')).valid;"; done | q >/dev/null
    is "$(wait_for "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'keypal flush worker' AND backend_start > '$since'" 1)" 1 \
       "$1: a new flush worker connected"
    is "$(wait_for "SELECT coalesce((SELECT used FROM keypal.quota_usage WHERE key_id = '$kid'), 0)" 10)" 10 "$1: the worker flushed the counts"
    is "$(q -c "SELECT extract(minute FROM hour AT TIME ZONE 'UTC') FROM keypal.quota_usage WHERE key_id = '$kid'")" 0 \
       "$1: the hour's requests into a whole UTC hour"
    is "$(q -c "SELECT count(*) FROM evil.calls WHERE by_role IS DISTINCT FROM 'keypal_evil'")" 0 \
       "$1: no function of the owner's schema ran as anyone else"
    is "$(q -c "SELECT rolsuper FROM pg_roles WHERE rolname = 'keypal_evil'")" f "$1: the database owner is still not a superuser"
}

reconnect_and_flush "search_path = evil, pg_catalog"

# Settings that would stop or skew a worker that trusted them: read-only, tiny timeouts,
# another session user or role, exit on any error, a half-hour time zone. And a reload of
# the configuration (SIGHUP) on top.
PGOPTIONS="-c search_path=pg_catalog,public" q -U keypal_evil >/dev/null <<'SQL'
ALTER DATABASE keypal_test SET default_transaction_read_only = on;
ALTER DATABASE keypal_test SET statement_timeout = 1;
ALTER DATABASE keypal_test SET lock_timeout = 1;
ALTER DATABASE keypal_test SET role = keypal_evil;
ALTER DATABASE keypal_test SET session_authorization = keypal_evil;
ALTER DATABASE keypal_test SET exit_on_error = on;
ALTER DATABASE keypal_test SET TimeZone = 'Asia/Kolkata';
SQL
q -c "SELECT pg_reload_conf()" >/dev/null
reconnect_and_flush "read-only default, 1 ms timeouts, session user, role, exit_on_error, TimeZone"
done_testing
