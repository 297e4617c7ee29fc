#!/usr/bin/env bash
# Tests the Node and Python clients against the running cluster (PGHOST/PGPORT, PGUSER a
# superuser), in a database of their own made by clients/setup.sql. Installs their packages
# from the npm and Python registries on first use (clients/node/node_modules, clients/python/.venv).
#   clients.sh [node|python ...]     (default: both)
set -euo pipefail
cd "$(dirname "$0")/.."
export KEYPAL_DB=${KEYPAL_DB:-keypal_clients}
psql -X -q -v ON_ERROR_STOP=1 -v db="$KEYPAL_DB" -d postgres -f clients/setup.sql

node_tests() {
    echo "== Node client (clients/node)"
    (cd clients/node && npm ci --no-audit --no-fund --loglevel=error && npm test)
}

python_tests() {
    echo "== Python client (clients/python)"
    local venv=clients/python/.venv
    if [ ! -x "$venv/bin/python" ]; then
        python3 -m venv "$venv"
    fi
    "$venv/bin/pip" install --quiet --disable-pip-version-check -e 'clients/python[test]'
    (cd clients/python && .venv/bin/mypy && .venv/bin/python -m pytest -q)
}

for which in "${@:-node python}"; do
    for w in $which; do "${w}_tests"; done
done
