#!/usr/bin/env bash
# Packaging: the Debian package scripts/package.sh built (scripts/test.sh builds it before
# these tests) holds keypal's files and nothing else, carries the release version, installs
# with dpkg, and a fresh cluster then runs CREATE EXTENSION keypal and verifies a key.
# The tarball holds the same files.
source "$(dirname "$0")/lib.sh"

root=$(cd "$(dirname "$0")/../.." && pwd)
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -1)
arch=$(dpkg --print-architecture)
deb="$root/target/package/postgresql-15-keypal_${version}_$arch.deb"
tarball="$root/target/package/keypal-$version-pg15-$arch.tar.gz"
ok "$( [ -s "$deb" ] && [ -s "$tarball" ]; echo $?)" "the package and tarball exist (scripts/package.sh builds them)"
[ -s "$deb" ] || { echo "# run: bash scripts/package.sh"; done_testing; exit 1; }

is "$(dpkg-deb -f "$deb" Package Version | tr '\n' ' ')" "Package: postgresql-15-keypal Version: $version " "its name and version"
ok "$(dpkg-deb -f "$deb" Depends | grep -Eq '^postgresql-15, libpq5, libc6 \(>= 2\.[0-9]+\)$'; echo $?)" \
   "it depends on PostgreSQL 15, libpq (a standby's worker ships through it) and the glibc its library needs ($(dpkg-deb -f "$deb" Depends))"
is "$(python3 -c "import json; print(json.load(open('$root/META.json'))['version'])")" "$version" "META.json names the same version"
files=$(dpkg-deb -c "$deb" | awk '{print $6}' | grep -v '/$' | sort | tr '\n' ' ')
want=$(printf '%s\n' ./usr/lib/postgresql/15/lib/keypal.so ./usr/share/postgresql/15/extension/keypal.control \
         ./usr/share/postgresql/15/extension/keypal--$version.sql \
         $(cd "$root/sql" && ls keypal--*--*.sql | sed 's|^|./usr/share/postgresql/15/extension/|') | sort | tr '\n' ' ')
is "$files" "$want" "it holds keypal.so, the control file, the install script and every upgrade script, nothing else"
is "$(tar -tzf "$tarball" | grep -v '/$' | sed 's|^|./|' | sort | tr '\n' ' ')" "$want" "the tarball holds the same files"

work=$(mktemp -d)
chmod 755 "$work"
dir=$work/cluster
trap 'bash "$root/scripts/cluster.sh" stop "$dir" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
dpkg-deb -x "$deb" "$work/x"
ok "$(! ldd "$work/x/usr/lib/postgresql/15/lib/keypal.so" | grep -q 'not found'; echo $?)" "keypal.so needs no library the system lacks"
ok "$(! readelf -S "$work/x/usr/lib/postgresql/15/lib/keypal.so" | grep -q -e '\.debug_info' -e '\.symtab'; echo $?)" "and is stripped"

rc=0
dpkg -i "$deb" >"$work/dpkg.log" 2>&1 || rc=$?
ok "$rc" "dpkg -i installs it"
is "$(dpkg-query -W -f '${Status} ${Version}' postgresql-15-keypal)" "install ok installed $version" "dpkg knows it installed"
bash "$root/scripts/cluster.sh" start "$dir" 55461 >/dev/null
is "$(psql -X -q -At -h "$dir" -p 55461 -U postgres -d postgres -v ON_ERROR_STOP=1 <<'SQL'
CREATE EXTENSION keypal;
CREATE TEMP TABLE k AS SELECT * FROM keypal_create(owner_id => 'packaged', scopes => '{read}');
SELECT extversion || ' ' || (SELECT (keypal_verify(key, 'read')).valid FROM k) FROM pg_extension WHERE extname = 'keypal';
SQL
)" "$version true" "a fresh cluster runs CREATE EXTENSION keypal from the package, and a key verifies"
done_testing
