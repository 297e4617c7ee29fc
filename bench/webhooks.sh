#!/usr/bin/env bash
# Webhook delivery bench: keypal (release) in a private cluster at PostgreSQL's default
# durability (fsync and synchronous_commit on), one receiver on 127.0.0.1
# (tests/shell/receiver.py: it checks every signature and logs every request), on the same
# machine as the server.
#   throughput  HOOK_EVENTS (default 20000) key.revoked events made by one keypal_revoke_all:
#               events/s from its commit to the last POST received, at webhook_concurrency
#               4 (the default) and 16
#   delay       HOOK_DELAYS (default 200) revokes, one per transaction, 50 ms apart: from each
#               commit (the clock of the statement after it) and from its event's insert to
#               the POST's arrival at the receiver: median, 95th percentile and max
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
N=${HOOK_EVENTS:-20000}
DELAYS=${HOOK_DELAYS:-200}
DIR=/tmp/keypal-bench-hooks
work=$(mktemp -d)
bench_cluster "$DIR" "${BENCH_PORT:-55443}" keypal_hooks_bench
rport=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
python3 tests/shell/receiver.py "$rport" whsec_bench "$work/log" &
receiver=$!
trap 'kill $receiver 2>/dev/null; bash scripts/cluster.sh stop "$DIR"; rm -rf "$work"' EXIT
q() { psql -X -q -At -v ON_ERROR_STOP=1 "$@"; }
q -c "CREATE EXTENSION keypal" -c "SELECT keypal_configure(webhook_allow_private => true)" >/dev/null
q -c "SELECT keypal_add_webhook('http://127.0.0.1:$rport/ok', 'whsec_bench', '{key.revoked}')" >/dev/null
sleep 0.5

lines() { [ -f "$work/log" ] && wc -l < "$work/log" || echo 0; }
wait_lines() {  # wait_lines N: until the receiver logged N requests (at most 10 minutes)
    for _ in $(seq 6000); do [ "$(lines)" -ge "$1" ] && return 0; sleep 0.1; done
    echo "timed out waiting for $1 deliveries (got $(lines))" >&2; return 1
}

throughput() {  # throughput CONCURRENCY
    q -c "SELECT keypal_configure(webhook_concurrency => $1)" >/dev/null
    q -c "SELECT count(*) FROM generate_series(1, $N) g, LATERAL keypal_create(owner_id => 'tp$1', name => 'k' || g)" >/dev/null
    : > "$work/log"
    q -c "SELECT keypal_revoke_all('tp$1')" >/dev/null
    local committed
    committed=$(date +%s.%N)
    wait_lines "$N"
    python3 - "$work/log" "$committed" "$N" "$1" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
last = max(r["at"] for r in rows)
bad = sum(not r["sig_ok"] for r in rows)
span = last - float(sys.argv[2])
print(f"throughput (webhook_concurrency {sys.argv[4]}): {int(sys.argv[3])} events in {span:.2f} s = "
      f"{int(sys.argv[3]) / span:.0f} events/s ({bad} bad signatures)")
EOF
}

echo "== webhook delivery to a local receiver (checks signatures, logs each request)"
throughput 4
throughput 16

q -c "SELECT keypal_configure(webhook_concurrency => 4)" >/dev/null
ids=$(q -c "SELECT string_agg(id::text, ' ') FROM generate_series(1, $DELAYS) g, LATERAL keypal_create(owner_id => 'delay', name => 'd' || g)")
: > "$work/log"
: > "$work/commits"
for id in $ids; do
    # The second statement runs once the first has committed: its clock is the commit's
    # upper bound (the server's clock, as the receiver's: one machine).
    echo "$id $(q -c "SELECT keypal_revoke('$id')" -c "SELECT extract(epoch FROM clock_timestamp())" | tail -1)" >> "$work/commits"
    sleep 0.05
done
wait_lines "$DELAYS"
q -F ' ' -c "SELECT key_id, extract(epoch FROM at) FROM keypal.events WHERE event = 'key.revoked' AND key_id IN (SELECT id FROM keypal.keys WHERE owner_id = 'delay')" > "$work/made"
python3 - "$work/log" "$work/commits" "$work/made" <<'EOF'
import json, sys
arrived = {json.loads(l)["body"]["data"]["keyId"]: json.loads(l)["at"] for l in open(sys.argv[1])}
def stats(path):
    d = sorted((arrived[k] - float(t)) * 1000 for k, t in (l.split() for l in open(path)))
    n = len(d)
    return f"median {d[n // 2]:.1f} ms, p95 {d[int(n * 0.95)]:.1f} ms, max {d[-1]:.1f} ms"
n = sum(1 for _ in open(sys.argv[2]))
print(f"delay to the POST's arrival ({n} revokes, one per transaction, 50 ms apart):")
print(f"  from the commit (the next statement's clock): {stats(sys.argv[2])}")
print(f"  from the event's insert (before the commit and its WAL flush): {stats(sys.argv[3])}")
EOF
