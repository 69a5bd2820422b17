#!/bin/sh
# Entry point of the offline PostgreSQL image (see build-offline-image.sh).
#
# Honours the contract of the official `postgres` image that pgfixture relies on:
# POSTGRES_USER, POSTGRES_PASSWORD, POSTGRES_DB, POSTGRES_INITDB_ARGS,
# POSTGRES_HOST_AUTH_METHOD, PGDATA, scripts in /docker-entrypoint-initdb.d, and
# arguments passed to `postgres` (a first argument starting with '-' means postgres).
# Like the official image, the server listens on TCP only once initialisation is over,
# so a successful TCP connection means the final server is ready.
set -eu

if [ "${1#-}" != "$1" ]; then
    set -- postgres "$@"
fi

if [ "${1:-}" != "postgres" ]; then
    exec "$@"
fi

: "${PGDATA:=/var/lib/postgresql/data}"
: "${POSTGRES_USER:=postgres}"
: "${POSTGRES_DB:=$POSTGRES_USER}"
: "${POSTGRES_INITDB_ARGS:=}"
: "${POSTGRES_HOST_AUTH_METHOD:=scram-sha-256}"
export PGDATA

if [ "$(id -u)" = 0 ]; then
    echo "docker-entrypoint.sh: this image runs PostgreSQL as user 'postgres'; start it without --user root" >&2
    exit 1
fi

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -z "${POSTGRES_PASSWORD:-}" ] && [ "$POSTGRES_HOST_AUTH_METHOD" != trust ]; then
        echo "docker-entrypoint.sh: POSTGRES_PASSWORD is not set; set it, or POSTGRES_HOST_AUTH_METHOD=trust" >&2
        exit 1
    fi
    mkdir -p "$PGDATA"
    chmod 0700 "$PGDATA"
    pwfile=$(mktemp)
    printf '%s\n' "${POSTGRES_PASSWORD:-}" > "$pwfile"
    # shellcheck disable=SC2086
    # Unlike the official image, TCP needs the password even on the container's loopback.
    initdb --username="$POSTGRES_USER" --pwfile="$pwfile" --auth-local=trust \
        --auth-host="$POSTGRES_HOST_AUTH_METHOD" \
        --encoding=UTF8 --locale=C $POSTGRES_INITDB_ARGS >/dev/null
    rm -f "$pwfile"
    printf '\nhost all all all %s\n' "$POSTGRES_HOST_AUTH_METHOD" >> "$PGDATA/pg_hba.conf"
    printf "listen_addresses = '*'\n" >> "$PGDATA/postgresql.conf"

    # A temporary server on the Unix socket only, for POSTGRES_DB and the init scripts.
    pg_ctl -D "$PGDATA" -o "-c listen_addresses='' -p 5432" -w start >/dev/null
    psql_cmd="psql -v ON_ERROR_STOP=1 --no-psqlrc --username=$POSTGRES_USER --no-password"
    if [ "$POSTGRES_DB" != postgres ]; then
        $psql_cmd --dbname=postgres -q -c "CREATE DATABASE \"$POSTGRES_DB\"" >/dev/null
    fi
    for f in /docker-entrypoint-initdb.d/*; do
        [ -e "$f" ] || continue
        case "$f" in
            *.sh)
                if [ -x "$f" ]; then "$f"; else . "$f"; fi ;;
            *.sql) $psql_cmd --dbname="$POSTGRES_DB" -q -f "$f" ;;
            *.sql.gz) gunzip -c "$f" | $psql_cmd --dbname="$POSTGRES_DB" -q ;;
            *) echo "docker-entrypoint.sh: ignoring $f" >&2 ;;
        esac
    done
    pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
    echo "docker-entrypoint.sh: PostgreSQL init process complete; ready for start up."
fi

exec "$@"
