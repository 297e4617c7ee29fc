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
