# Shared by the bench scripts (sourced): builds and installs keypal for release, and starts
# a fresh private cluster at PostgreSQL's default durability.
#   bench_cluster DIR PORT DATABASE [extra postgresql.conf line ...]
# exports PGHOST/PGPORT/PGUSER/PGDATABASE for it (the database is created); the caller stops
# it (bash scripts/cluster.sh stop DIR).
export PATH="$HOME/.cargo/bin:$PATH"
bench_cluster() {
    local dir=$1 port=$2 db=$3
    shift 3
    bash scripts/setup.sh
    cargo pgrx install --release --pg-config /usr/lib/postgresql/15/bin/pg_config >/dev/null
    export PGHOST=$dir PGPORT=$port PGUSER=postgres PGDATABASE=$db
    bash scripts/cluster.sh stop "$dir" 2>/dev/null || true
    rm -rf "$dir"
    # (cluster.sh turns fsync off for test clusters; a later line wins.)
    bash scripts/cluster.sh start "$dir" "$port" "fsync = on" "synchronous_commit = on" "$@"
    psql -X -q -d postgres -c "CREATE DATABASE $db"
}
# fresh_db NAME [EXTENSION ...]: a new, empty database with keypal (and the extensions named)
fresh_db() {
    local db=$1 ext
    shift
    psql -X -q -d postgres -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db"
    psql -X -q -d "$db" -c "CREATE EXTENSION keypal"
    for ext in "$@"; do psql -X -q -d "$db" -c "CREATE EXTENSION IF NOT EXISTS $ext"; done
}
# timed DB SQL: seconds the SQL takes (wall clock, in one session, committed)
timed() {
    psql -X -q -At -v ON_ERROR_STOP=1 -d "$1" <<SQL | tail -1
SET statement_timeout = 0;
CREATE TEMP TABLE t0 AS SELECT clock_timestamp() AS t;
$2
SELECT round(extract(epoch FROM clock_timestamp() - t)::numeric, 3) FROM t0;
SQL
}
