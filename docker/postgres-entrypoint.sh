#!/usr/bin/env bash
# Entrypoint of docker/postgres.Dockerfile: creates the cluster in $PGDATA on the first start
# (superuser $POSTGRES_USER with the password from $POSTGRES_PASSWORD or the file named by
# $POSTGRES_PASSWORD_FILE, database $POSTGRES_DB), then runs the server in the foreground.
# The official postgres image does the same on its first start; later starts only serve.
set -euo pipefail

die() {
    printf 'tinytale-postgres: ERROR: %s\n' "$*" >&2
    exit 2
}

: "${PGDATA:=/var/lib/postgresql/data}"
user=${POSTGRES_USER:-postgres}
database=${POSTGRES_DB:-$user}

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    password=${POSTGRES_PASSWORD:-}
    if [ -n "${POSTGRES_PASSWORD_FILE:-}" ]; then
        [ -r "$POSTGRES_PASSWORD_FILE" ] || die "POSTGRES_PASSWORD_FILE='$POSTGRES_PASSWORD_FILE' \
is not readable by uid $(id -u)"
        password=$(cat -- "$POSTGRES_PASSWORD_FILE")
    fi
    [ -n "$password" ] || die "the first start needs a password: set POSTGRES_PASSWORD or \
POSTGRES_PASSWORD_FILE"
    pwfile=$(mktemp)
    printf '%s\n' "$password" >"$pwfile"
    initdb --pgdata "$PGDATA" --username "$user" --pwfile "$pwfile" --encoding UTF8 \
        --locale C.UTF-8 --auth-local trust --auth-host scram-sha-256 >/dev/null
    rm -f "$pwfile"
    # Any address may connect with the password; compose keeps the address space to the
    # database network, which only the MLflow server shares.
    printf 'host all all all scram-sha-256\n' >>"$PGDATA/pg_hba.conf"
    if [ "$database" != postgres ]; then
        # Socket only while the database is created: nobody connects over TCP before it exists
        # (and a healthcheck on TCP stays unhealthy until the real start below).
        pg_ctl --pgdata "$PGDATA" --options "-c listen_addresses=''" --wait --silent start
        createdb --username "$user" "$database"
        pg_ctl --pgdata "$PGDATA" --mode fast --wait --silent stop
    fi
    printf 'tinytale-postgres: created the cluster in %s (user %s, database %s)\n' \
        "$PGDATA" "$user" "$database" >&2
fi
unset POSTGRES_PASSWORD
exec postgres -D "$PGDATA" -c listen_addresses='*'
