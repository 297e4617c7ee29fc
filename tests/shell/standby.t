#!/usr/bin/env bash
# A streaming replica on loopback: a key created on the primary verifies on the standby,
# and once the primary revokes it, the standby answers REVOKED. Limits still decide there.
source "$(dirname "$0")/lib.sh"

PGBIN=/usr/lib/postgresql/15/bin
SDIR=${PGHOST}-standby
SPORT=$((PGPORT + 100))
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
sq() { psql -X -q -At -v ON_ERROR_STOP=1 -h "$SDIR" -p "$SPORT" "$@"; }

read -r id key < <(q -F ' ' -c "SELECT id, key FROM keypal_create(owner_id => 'standby', scopes => '{read}')")
rkey=$(q -c "SELECT key FROM keypal_create(owner_id => 'standby', rate_limit => '{\"requests\": 2, \"window\": \"1h\"}')")

as_pg "$PGBIN/pg_ctl" -D "$SDIR" -m immediate stop >/dev/null 2>&1 || true
rm -rf "$SDIR"
# pg_basebackup creates the directory itself, with the permissions the server wants (-c fast:
# not waiting minutes for a spread checkpoint).
as_pg "$PGBIN/pg_basebackup" -h "$PGHOST" -p "$PGPORT" -U postgres -D "$SDIR" -R -X stream -c fast >/dev/null
printf "port = %s\nunix_socket_directories = '%s'\nhot_standby = on\n" "$SPORT" "$SDIR" >> "$SDIR/postgresql.conf"
as_pg "$PGBIN/pg_ctl" -D "$SDIR" -l "$SDIR/server.log" -w start >/dev/null
trap 'as_pg "$PGBIN/pg_ctl" -D "$SDIR" -m fast stop >/dev/null 2>&1; rm -rf "$SDIR"' EXIT

is "$(sq -c "SELECT pg_is_in_recovery()")" t "the standby is in recovery"
is "$(sq -c "SELECT valid FROM keypal_verify('$key', 'read')")" t "a key created on the primary verifies on the standby"
is "$(sq -c "SELECT error_code FROM keypal_verify('$key', 'write')")" INSUFFICIENT_SCOPE "with its scopes"

q -c "SELECT keypal_revoke('$id')" >/dev/null
lsn=$(q -c "SELECT pg_current_wal_lsn()")
for _ in $(seq 100); do
    [ "$(sq -c "SELECT pg_last_wal_replay_lsn() >= '$lsn'")" = t ] && break
    sleep 0.1
done
is "$(sq -c "SELECT error_code FROM keypal_verify('$key', 'read')")" REVOKED "once the primary revoked it and the standby replayed that: REVOKED"

is "$(sq -c "SELECT (keypal_verify('$rkey')).valid" -c "SELECT (keypal_verify('$rkey')).valid" -c "SELECT (keypal_verify('$rkey')).error_code" | tr '\n' ' ')" "t t RATE_LIMITED " "the standby rate-limits in its own shared memory"
done_testing
