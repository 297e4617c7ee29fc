#!/usr/bin/env bash
# A streaming replica on loopback: a key created on the primary verifies on the standby,
# and once the primary revokes it, the standby answers REVOKED. Limits still decide there.
source "$(dirname "$0")/lib.sh"

SDIR=${PGHOST}-standby
SPORT=$((PGPORT + 100))
sq() { psql -X -q -At -v ON_ERROR_STOP=1 -h "$SDIR" -p "$SPORT" "$@"; }

read -r id key < <(q -F ' ' -c "SELECT id, key FROM keypal_create(owner_id => 'standby', scopes => '{read}')")
rkey=$(q -c "SELECT key FROM keypal_create(owner_id => 'standby', rate_limit => '{\"requests\": 2, \"window\": \"1h\"}')")

bash "$CLUSTER" standby "$SDIR" "$SPORT" "$PGHOST" "$PGPORT"
trap 'bash "$CLUSTER" stop "$SDIR"; rm -rf "$SDIR"' EXIT

is "$(sq -c "SELECT pg_is_in_recovery()")" t "the standby is in recovery"
is "$(sq -c "SELECT valid FROM keypal_verify('$key', 'read')")" t "a key created on the primary verifies on the standby"
is "$(sq -c "SELECT error_code FROM keypal_verify('$key', 'write')")" INSUFFICIENT_SCOPE "with its scopes"

q -c "SELECT keypal_revoke('$id')" >/dev/null
wait_replay "$SDIR" "$SPORT"
is "$(sq -c "SELECT error_code FROM keypal_verify('$key', 'read')")" REVOKED "once the primary revoked it and the standby replayed that: REVOKED"

is "$(sq -c "SELECT (keypal_verify('$rkey')).valid" -c "SELECT (keypal_verify('$rkey')).valid" -c "SELECT (keypal_verify('$rkey')).error_code" | tr '\n' ' ')" "t t RATE_LIMITED " "the standby rate-limits in its own shared memory"
done_testing
