#!/usr/bin/env bash
# Builds keypal for release and packages it for PostgreSQL 15 on this architecture, for a DBA
# to install without a Rust toolchain:
#   target/package/postgresql-15-keypal_<version>_<arch>.deb   (dpkg -i; depends on postgresql-15)
#   target/package/keypal-<version>-pg15-<arch>.tar.gz         (the same files, from /: tar -xzf -C /)
# Both hold what `cargo pgrx package` produces: keypal.so, keypal.control, keypal--<version>.sql
# and the upgrade scripts keypal--<old>--<version>.sql.
# Prints the two paths. PG_CONFIG picks another pg_config (default: Debian's 15).
set -euo pipefail
umask 022   # the package's files and DEBIAN/ are world-readable, whatever the caller's umask
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
major=$("$PG_CONFIG" --version | sed -E 's/^PostgreSQL ([0-9]+).*/\1/')
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
arch=$(dpkg --print-architecture)
out=target/package
stage=$out/stage

rm -rf "$stage"
mkdir -p "$stage"
cargo pgrx package --pg-config "$PG_CONFIG" --out-dir "$stage" >&2
# Nothing of the build machine's but these files: check what the package will hold.
so=$(find "$stage" -name keypal.so)
[ -n "$so" ] && [ -e "$stage/$("$PG_CONFIG" --sharedir)/extension/keypal--$version.sql" ] ||
    { echo "package: cargo pgrx package did not produce keypal.so and keypal--$version.sql" >&2; exit 1; }
strip --strip-unneeded "$so"
# The newest glibc symbol version the library uses: the package's libc6 dependency.
glibc=$(objdump -T "$so" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -V | tail -1)

tarball=$out/keypal-$version-pg$major-$arch.tar.gz
tar -czf "$tarball" --owner=0 --group=0 -C "$stage" usr

pkg=postgresql-$major-keypal
mkdir -p "$stage/DEBIAN"
cat >"$stage/DEBIAN/control" <<CONTROL
Package: $pkg
Version: $version
Architecture: $arch
Maintainer: keypal developers <keypal@localhost>
Depends: postgresql-$major, libpq5, libc6 (>= $glibc)
Section: database
Priority: optional
Homepage: https://pgxn.org/dist/keypal/
Description: API-key management inside PostgreSQL $major
 keypal creates, verifies, rotates and revokes API keys inside the database:
 scopes, rate limits, quotas, IP and region rules, environments, policies,
 parent/child keys, an audit log, webhooks, schedules and request signing.
 After installing: CREATE EXTENSION keypal; (add keypal to
 shared_preload_libraries for its background worker to start with the server).
CONTROL
deb=$out/${pkg}_${version}_$arch.deb
dpkg-deb --build --root-owner-group "$stage" "$deb" >&2
rm -rf "$stage"
echo "$deb"
echo "$tarball"
