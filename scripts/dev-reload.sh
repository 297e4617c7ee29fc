#!/usr/bin/env bash
# Developer loop: reinstall the extension and rerun the SQL suite against a running cluster.
#   scripts/dev-reload.sh DIR PORT [test files...]
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:?cluster dir}; port=${2:?port}; shift 2
cargo pgrx install --pg-config /usr/lib/postgresql/15/bin/pg_config >/dev/null 2>&1
export PGHOST=$dir PGPORT=$port PGUSER=postgres
psql -X -q -v ON_ERROR_STOP=1 -d postgres -f tests/setup.sql 2>/dev/null
if [ $# -eq 0 ]; then set -- tests/sql/*.sql; fi
pg_prove -d keypal_test "$@"
