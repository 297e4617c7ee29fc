#!/usr/bin/env bash
# Installs what building and testing keypal needs on Debian 12, as root. Idempotent:
# a second run checks and does nothing.
set -euo pipefail

PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
PGRX_VERSION=0.18.0
export PATH="$HOME/.cargo/bin:$PATH"

packages=(postgresql-15 postgresql-server-dev-15 libclang-dev clang pkg-config sudo
          postgresql-15-pgtap libtap-parser-sourcehandler-pgtap-perl
          postgresql-15-cron python3 python3-venv nodejs binutils)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# Debian's own nodejs ships npm apart (NodeSource's includes it): the Node client needs it.
if ! command -v npm >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm >/dev/null
fi
# The Debian server package starts a cluster of its own; keypal uses private clusters.
if command -v pg_lsclusters >/dev/null && pg_lsclusters -h 2>/dev/null | grep -q online; then
    pg_ctlcluster 15 main stop 2>/dev/null || true
fi

if ! cargo pgrx --version 2>/dev/null | grep -q "$PGRX_VERSION"; then
    echo "setup: installing cargo-pgrx $PGRX_VERSION"
    cargo install cargo-pgrx --version "$PGRX_VERSION" --locked
fi
if ! grep -qs "pg15" "$HOME/.pgrx/config.toml"; then
    cargo pgrx init --pg15 "$PG_CONFIG"
fi
