#!/usr/bin/env bash
# Client bench (issue 12): verifies/s seen by an application, through each middleware, against
# a bare verify call from the same client library. keypal (release) in a private cluster at
# PostgreSQL's default durability; one key with scope "read"; each server is its own process
# with a pool of POOL (4) connections as the verify-only role; HTTP load comes from a separate
# Node process (clients/node/bench/load.mjs): CONCURRENCY (8) keep-alive connections, each
# request `Authorization: Bearer <key>`, every answer checked to be 200.
#   node   verify   keys.verify(key, {scope}) from keypal-pg, CONCURRENCY loops (the Node baseline)
#          express  keypalMiddleware (Express 5)      hono  keypalMiddleware (Hono on @hono/node-server)
#          next     withApiKey (a fetch-style route handler on @hono/node-server)
#   python verify   AsyncKeypal.verify from keypal_pg, CONCURRENCY tasks (the Python baseline)
#          fastapi  Depends(require_key(...)) on uvicorn[standard], one worker
#          asgi     KeypalMiddleware around a bare ASGI app on the same uvicorn
#   *_plain: the same server and route with no middleware (the ceiling of the framework and of
#   this load on this machine): the last column is the middleware's rate against it.
# ROUNDS (3) rounds of BENCH_SECONDS (5) s each, interleaved; prints the median per target and
# its ratio to its language's bare verify. 2 cores: client, server and PostgreSQL share them.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
SECS=${BENCH_SECONDS:-5}
ROUNDS=${ROUNDS:-3}
CONC=${CONCURRENCY:-8}
export POOL=${POOL:-4}
DIR=/tmp/keypal-bench-clients
DB=keypal_clients_bench
bench_cluster "$DIR" "${BENCH_PORT:-55447}" "$DB"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; bash scripts/cluster.sh stop "$DIR"' EXIT
psql -X -q -v ON_ERROR_STOP=1 -v db="$DB" -d postgres -f clients/setup.sql
key=$(psql -X -q -At -c "SELECT key FROM keypal_create(owner_id => 'bench', scopes => '{read}')")
export DATABASE_URL="postgresql://keypal_web@127.0.0.1:$PGPORT/$DB"

(cd clients/node && npm ci --no-audit --no-fund --loglevel=error && npx tsc -p .)
venv=clients/python/.venv
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check -e 'clients/python[test]' 'uvicorn[standard]'

port=55610
declare -A url
for fw in express hono next express-plain hono-plain; do
    node clients/node/bench/server.mjs "$fw" "$port" & pids+=($!)
    url[${fw/-/_}]="http://127.0.0.1:$port/api/data"; port=$((port + 1))
done
for app in fastapi asgi plain; do
    "$venv/bin/uvicorn" "app:${app}_app" --app-dir clients/python/bench --host 127.0.0.1 --port "$port" \
        --log-level warning --no-access-log & pids+=($!)
    url[${app/plain/fastapi_plain}]="http://127.0.0.1:$port/api/data"; port=$((port + 1))
done

measure() {
    case $1 in
    node_verify) node clients/node/bench/verify.mjs "$key" "$SECS" "$CONC" ;;
    python_verify) "$venv/bin/python" clients/python/bench/verify.py "$key" "$SECS" "$CONC" ;;
    *) node clients/node/bench/load.mjs "${url[$1]}" "$key" "$SECS" "$CONC" ;;
    esac
}
targets=(node_verify express hono next express_plain hono_plain python_verify fastapi asgi fastapi_plain)
declare -A runs
for ((r = 1; r <= ROUNDS; r++)); do
    for t in "${targets[@]}"; do runs[$t]+="$(measure "$t") "; done
done
median() { tr ' ' '\n' | grep . | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
declare -A plain=([express]=express_plain [hono]=hono_plain [next]=hono_plain [fastapi]=fastapi_plain [asgi]=fastapi_plain)
printf '%-14s %8s %14s %10s   (runs)\n' target 'req/s' 'vs bare verify' 'vs plain'
for t in "${targets[@]}"; do
    base=node_verify; [[ $t == python_verify || $t == fastapi* || $t == asgi ]] && base=python_verify
    m=$(echo "${runs[$t]}" | median); b=$(echo "${runs[$base]}" | median)
    p=$m; [ -n "${plain[$t]:-}" ] && p=$(echo "${runs[${plain[$t]}]}" | median)
    awk -v t="$t" -v m="$m" -v b="$b" -v p="$p" -v runs="${runs[$t]}" \
        'BEGIN { printf "%-14s %8d %13.2fx %9.2fx   (%s)\n", t, m, m / b, m / p, runs }'
done
