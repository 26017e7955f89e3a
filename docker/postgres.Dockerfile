# PostgreSQL 15 from Debian bookworm's own packages, for machines without an image registry
# (scripts/docker-offline.sh builds it as tinytale-postgres:15 and points compose.yaml's
# TINYTALE_POSTGRES_IMAGE at it). Online users run the official `postgres:15` image instead;
# this one takes the subset of its interface that compose.yaml uses: POSTGRES_USER,
# POSTGRES_DB, POSTGRES_PASSWORD(_FILE), PGDATA=/var/lib/postgresql/data, `pg_isready` and
# `pg_dump`/`pg_restore`/`psql` on PATH, trust on the local socket, scram-sha-256 over TCP.
#   docker build -f docker/postgres.Dockerfile --build-arg BASE_IMAGE=tinytale-base:bookworm \
#       -t tinytale-postgres:15 .
# Unlike the official image it starts as the unprivileged `postgres` user right away (the
# official one starts as root and drops to `postgres` in its entrypoint).

ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
# Debian's package creates a cluster on install; this image makes its own in PGDATA at the
# first start, so the packaged one is removed.
RUN apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        postgresql-15 >/dev/null \
    && pg_dropcluster 15 main \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb \
    && mkdir -p /var/lib/postgresql/data /var/run/postgresql \
    && chown -R postgres:postgres /var/lib/postgresql /var/run/postgresql \
    && chmod 0700 /var/lib/postgresql/data
COPY docker/postgres-entrypoint.sh /usr/local/bin/tinytale-postgres
ENV PATH=/usr/lib/postgresql/15/bin:$PATH \
    PGDATA=/var/lib/postgresql/data \
    LANG=C.UTF-8
USER postgres
# `docker stop` sends this: SIGTERM would be PostgreSQL's "smart" shutdown, which waits for
# the MLflow server's pooled connections to close; SIGINT is "fast" (as in the official image).
STOPSIGNAL SIGINT
EXPOSE 5432
ENTRYPOINT ["/bin/bash", "/usr/local/bin/tinytale-postgres"]
