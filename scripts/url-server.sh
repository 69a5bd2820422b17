# Sourced by scripts/test.sh and scripts/benchmarks.sh: a server of the user's for the
# url backend (PGFIXTURE_URL), a plain PostgreSQL cluster with password authentication
# over TCP on a free loopback port, as a team's CI service or shared test server is.
#
#   . scripts/url-server.sh
#   start_url_server && PGFIXTURE_URL=$url ...
#
# start_url_server sets `url` (the superuser `postgres`, a password of its own, the
# database `postgres`) and stops the cluster and removes its directory when the
# script exits. Binaries: the newest /usr/lib/postgresql/*/bin, else pg_config's.
# Run as root, the cluster runs as the user postgres (else nobody), through setpriv.

url_dir=
stop_url_server() {
    [ -n "$url_dir" ] || return 0
    "${as_owner[@]}" "$url_bin/pg_ctl" -D "$url_dir/data" -m immediate stop >/dev/null 2>&1
    rm -rf "$url_dir"
}
start_url_server() {
    url_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
    if [ -z "$url_bin" ] && command -v pg_config >/dev/null 2>&1; then
        url_bin=$(pg_config --bindir)
    fi
    [ -x "$url_bin/initdb" ] || { echo "url-server.sh: no PostgreSQL binaries (initdb) under /usr/lib/postgresql/*/bin or from pg_config --bindir" >&2; return 1; }
    url_dir=$(mktemp -d /tmp/pgfixture-url-server.XXXXXX)
    trap stop_url_server EXIT
    as_owner=()
    if [ "$(id -u)" = 0 ]; then
        # PostgreSQL will not run as root.
        local owner
        owner=$(id -u postgres 2>/dev/null || echo 65534)
        chown "$owner" "$url_dir"
        as_owner=(setpriv --reuid="$owner" --regid="$(id -g "$owner" 2>/dev/null || echo 65534)" --clear-groups)
    fi
    local password port
    password=url-$RANDOM$RANDOM
    "${as_owner[@]}" sh -c "umask 077; echo '$password' > '$url_dir/pw'"
    "${as_owner[@]}" "$url_bin/initdb" -D "$url_dir/data" -U postgres --auth=scram-sha-256 \
        --pwfile="$url_dir/pw" -E UTF8 --no-sync >"$url_dir/initdb.log" 2>&1 ||
        { cat "$url_dir/initdb.log" >&2; return 1; }
    for _ in $(seq 1 50); do
        port=$((20000 + RANDOM % 20000))
        (: </dev/tcp/127.0.0.1/$port) 2>/dev/null || break
    done
    "${as_owner[@]}" "$url_bin/pg_ctl" -D "$url_dir/data" -l "$url_dir/server.log" -w -s \
        -o "-p $port -k $url_dir -c listen_addresses=127.0.0.1 -c fsync=off" start ||
        { cat "$url_dir/server.log" >&2; return 1; }
    url=postgres://postgres:$password@127.0.0.1:$port/postgres
}
