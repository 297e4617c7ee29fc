#!/usr/bin/env bash
# Try keypal: builds and installs the extension, starts a local cluster (as user postgres),
# creates the extension in database keypal_demo and runs a short psql demo. The cluster
# keeps running afterwards; the end of the output says how to connect and how to stop it.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
DIR=${KEYPAL_DEMO_DIR:-/var/tmp/keypal-demo}
PORT=${KEYPAL_DEMO_PORT:-55499}

bash scripts/setup.sh
echo "== building and installing keypal (release build; the first one takes a few minutes)"
cargo pgrx install --release --pg-config /usr/lib/postgresql/15/bin/pg_config >/dev/null
bash scripts/cluster.sh start "$DIR" "$PORT"
export PGHOST=$DIR PGPORT=$PORT PGUSER=postgres
psql -X -q -d postgres -c "DROP DATABASE IF EXISTS keypal_demo WITH (FORCE)" -c "CREATE DATABASE keypal_demo"  # FORCE: its flush worker may be connected
psql -X -q -d keypal_demo -c "CREATE EXTENSION keypal"
echo "== demo (docs/demo.sql)"
psql -X -d keypal_demo -v ON_ERROR_STOP=1 --echo-queries -f docs/demo.sql
cat <<MSG

keypal is installed and running.
  connect:  psql -h $DIR -p $PORT -U postgres keypal_demo
  stop:     bash scripts/cluster.sh stop $DIR
MSG
