#!/usr/bin/env bash
# Runs every keypal test, as root on a fresh Debian 12 machine:
#   1. cargo fmt/clippy, 2. pure Rust unit tests + #[pg_test]s (cargo pgrx test),
#   3. the SQL contract suite (pgTAP, pg_prove) and the multi-session shell tests (prove)
#      against the installed extension, twice: in a plain cluster (table-backed rate limits)
#      and in one with shared_preload_libraries = 'keypal' (shared-memory rate limits).
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
export PGUSER=postgres
for mode in plain preload; do
    echo "== SQL contract suite ($mode)"
    export KEYPAL_TEST_MODE=$mode
    export PGHOST=/tmp/keypal-sql-test-$mode PGPORT=$([ "$mode" = plain ] && echo 55439 || echo 55438)
    bash scripts/cluster.sh stop "$PGHOST" 2>/dev/null || true
    rm -rf "$PGHOST"
    if [ "$mode" = preload ]; then
        # A tiny limiter table, so the tests also cover keys past its cap.
        bash scripts/cluster.sh start "$PGHOST" "$PGPORT" "shared_preload_libraries = 'keypal'" "keypal.rate_limit_slots = 64" \
            "keypal.database = 'keypal_test'" "keypal.flush_interval = 200"
    else
        bash scripts/cluster.sh start "$PGHOST" "$PGPORT"
    fi
    trap 'bash scripts/cluster.sh stop "$PGHOST"' EXIT
    psql -X -q -v ON_ERROR_STOP=1 -d postgres -f tests/setup.sql
    pg_prove -d keypal_test tests/sql/*.sql
    prove tests/shell/
    bash scripts/cluster.sh stop "$PGHOST"
    trap - EXIT
done
