#!/usr/bin/env bash
# Runs every keypal test, as root on a fresh Debian 12 machine:
#   1. cargo fmt/clippy, 2. pure Rust unit tests + #[pg_test]s (cargo pgrx test),
#   3. the release package (scripts/package.sh), 4. the SQL contract suite (pgTAP, pg_prove) and the multi-session shell tests (prove)
#      against the installed extension, in one cluster, 5. the Node and Python clients (scripts/clients.sh) against that cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}

bash scripts/setup.sh

echo "== fmt and clippy"
cargo fmt --check
cargo clippy --quiet --features "pg15 pg_test" --tests -- -D warnings

echo "== unit tests and #[pg_test]s"
PGRX_TEST_DIR=/tmp/keypal-pgrx-test
rm -rf "$PGRX_TEST_DIR"
cargo pgrx test pg15 --runas postgres --pgdata "$PGRX_TEST_DIR"

cargo pgrx install --pg-config "$PG_CONFIG" >/dev/null
echo "== package (release build; tests/shell/package.t installs it)"
bash scripts/package.sh
export PGUSER=postgres
echo "== SQL contract suite and multi-session tests"
# One cluster, as a user would start it (keypal not preloaded: shell tests that need the
# preload restart it with one); flushes every 200 ms so the tests wait little.
export PGHOST=/tmp/keypal-sql-test PGPORT=55439
bash scripts/cluster.sh stop "$PGHOST" 2>/dev/null || true
rm -rf "$PGHOST"
# RUST_BACKTRACE=1 in the server's environment: pgrx would then add a Rust backtrace to the
# DETAIL of a PostgreSQL error that crosses Rust code; 14_errors.sql checks the DETAILs of
# errors raised inside keypal.create_keys (spi::passing_errors) hold none.
RUST_BACKTRACE=1 bash scripts/cluster.sh start "$PGHOST" "$PGPORT" "keypal.flush_interval = 200"
trap 'bash scripts/cluster.sh stop "$PGHOST"' EXIT
psql -X -q -v ON_ERROR_STOP=1 -d postgres -f tests/setup.sql
pg_prove -d keypal_test tests/sql/*.sql
prove tests/shell/
bash scripts/clients.sh
