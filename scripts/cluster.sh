#!/usr/bin/env bash
# A private PostgreSQL 15 cluster run by an unprivileged user (PostgreSQL refuses root).
#   cluster.sh start DIR PORT [extra postgresql.conf line ...]
#   cluster.sh standby DIR PORT PRIMARY_DIR PRIMARY_PORT [extra postgresql.conf line ...]
#       a fresh streaming standby of that primary (pg_basebackup -R, hot_standby), started
#   cluster.sh stop DIR
# Clients connect over the Unix socket in DIR: psql -h DIR -p PORT -U postgres
set -euo pipefail

PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
RUNAS=${KEYPAL_RUNAS:-postgres}

as_user() {
    if [ "$(id -u)" = 0 ]; then runuser -u "$RUNAS" -- "$@"; else "$@"; fi
}

cmd=${1:?start|stop}
dir=${2:?cluster directory}
case "$cmd" in
start)
    port=${3:?port}
    shift 3
    if [ ! -f "$dir/PG_VERSION" ]; then
        mkdir -p "$dir"
        [ "$(id -u)" = 0 ] && chown "$RUNAS" "$dir"
        as_user "$PGBIN/initdb" -D "$dir" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >/dev/null
        {
            echo "listen_addresses = '127.0.0.1'"
            echo "unix_socket_directories = '$dir'"
            echo "port = $port"
            echo "fsync = off"
            echo "max_connections = 100"
            for line in "$@"; do echo "$line"; done
        } >> "$dir/postgresql.conf"
    fi
    # Already running (a second `try`): leave it be.
    if ! as_user "$PGBIN/pg_ctl" -D "$dir" status >/dev/null 2>&1; then
        as_user "$PGBIN/pg_ctl" -D "$dir" -l "$dir/server.log" -w start >/dev/null
    fi
    ;;
standby)
    port=${3:?port}
    primary=${4:?primary directory}
    primary_port=${5:?primary port}
    shift 5
    as_user "$PGBIN/pg_ctl" -D "$dir" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$dir"
    # pg_basebackup makes the directory itself, with the permissions the server wants;
    # -c fast: not waiting minutes for a spread checkpoint.
    as_user "$PGBIN/pg_basebackup" -h "$primary" -p "$primary_port" -U postgres -D "$dir" -R -X stream -c fast \
        2>/dev/null
    {
        echo "port = $port"
        echo "unix_socket_directories = '$dir'"
        echo "hot_standby = on"
        for line in "$@"; do echo "$line"; done
    } >> "$dir/postgresql.conf"
    as_user "$PGBIN/pg_ctl" -D "$dir" -l "$dir/server.log" -w start >/dev/null
    ;;
stop)
    if [ -f "$dir/postmaster.pid" ]; then
        as_user "$PGBIN/pg_ctl" -D "$dir" -m fast -w stop >/dev/null
    fi
    ;;
*)
    echo "usage: $0 start DIR PORT | standby DIR PORT PRIMARY_DIR PRIMARY_PORT | stop DIR" >&2
    exit 2
    ;;
esac
