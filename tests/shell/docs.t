#!/usr/bin/env bash
# The documentation runs: every ```sql block of README.md and docs/*.md (and docs/demo.sql,
# what scripts/try.sh shows), in order, in a
# fresh database, as a reader pastes them (tests/docs/run.py; an ```output block after one is
# what it must print). The examples change server settings (the salt) with ALTER SYSTEM, so
# they run in a cluster of their own, as a new user's would be.
source "$(dirname "$0")/lib.sh"
root=$(cd "$(dirname "$0")/../.." && pwd)
dir=$(mktemp -d)
chmod 755 "$dir"
trap 'bash "$root/scripts/cluster.sh" stop "$dir/pg" >/dev/null 2>&1 || true; rm -rf "$dir"' EXIT
# pg_cron as USAGE.md sets it up (its database is the one run.py makes for USAGE.md).
# keypal preloaded, so that the replay memory of request signing starts with the server: a
# signature dated within 5 s of its start is refused (USAGE.md says so), so wait that out.
bash "$root/scripts/cluster.sh" start "$dir/pg" 55464 "shared_preload_libraries = 'pg_cron,keypal'" \
    "cron.database_name = 'keypal_docs_usage_md'" >/dev/null
export PGHOST=$dir/pg PGPORT=55464 PGUSER=postgres
sleep 6
python3 "$root/tests/docs/run.py" "$root/README.md" "$root"/docs/*.md "$root/docs/demo.sql"
