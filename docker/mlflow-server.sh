#!/usr/bin/env bash
# Start tinytale's MLflow tracking server: the ENTRYPOINT of docker/mlflow.Dockerfile, and the
# same script on a host without Docker (tests/e2e/test_security.py runs it as a subprocess), so that
# both start `mlflow server` with the same flags:
#   runs database          $TINYTALE_MLFLOW_DATABASE_URI: PostgreSQL in compose.yaml; SQLite in
#                          $TINYTALE_MLFLOW_HOME/db/mlflow.db by default. Brought to the installed
#                          MLflow's schema (`mlflow db upgrade`) before every start.
#   artifacts              $TINYTALE_MLFLOW_HOME/artifacts or an S3 bucket, served over HTTP
#                          (--serve-artifacts)
#   Host header check      --allowed-hosts "$MLFLOW_SERVER_ALLOWED_HOSTS", always explicit
#   basic auth             with TINYTALE_MLFLOW_AUTH=1 (MLflow's `basic-auth` app)
# Everything is configured by environment; the script takes no arguments. Every refusal is one
# line `mlflow-server: ERROR: ...` on stderr and exit status 2, before anything is started.
#
# Environment
#   MLFLOW_SERVER_ALLOWED_HOSTS    required: comma-separated Host headers the server answers
#                                  (e.g. `mlflow:5000,localhost:*,127.0.0.1:*`); empty or `*`
#                                  is refused. Others get 403 (DNS-rebinding protection).
#   MLFLOW_SERVER_CORS_ALLOWED_ORIGINS  optional; MLflow's default is localhost origins; `*` is
#                                  refused.
#   TINYTALE_MLFLOW_HOME           state folder (default /mlflow, the image's volumes)
#   TINYTALE_MLFLOW_DATABASE_URI   the runs and registry database: sqlite:////abs/path.db
#                                  (default $TINYTALE_MLFLOW_HOME/db/mlflow.db) or
#                                  postgresql://USER@HOST:PORT/DB without a password (a URI is
#                                  visible in `ps` and `docker inspect`); the password comes from
#                                  TINYTALE_MLFLOW_DATABASE_PASSWORD_FILE (a compose secret),
#                                  written to a mode-600 .pgpass file at start.
#   TINYTALE_MLFLOW_MIGRATE_FROM   a SQLite MLflow database to copy into the (new, PostgreSQL)
#                                  database instead of serving: docker/mlflow-migrate.py
#   TINYTALE_MLFLOW_ARTIFACTS_DESTINATION  where the served artifacts are stored (default
#                                  $TINYTALE_MLFLOW_HOME/artifacts); e.g. s3://bucket/prefix with
#                                  AWS_* credentials and MLFLOW_S3_ENDPOINT_URL in the environment.
#   TINYTALE_MLFLOW_HOST           interface to bind (default 127.0.0.1; the image sets 0.0.0.0,
#                                  and compose publishes the port on the host's loopback only)
#   TINYTALE_MLFLOW_PORT           port to listen on (default 5000)
#   TINYTALE_MLFLOW_WORKERS        uvicorn workers (default 2)
#   TINYTALE_MLFLOW_ACCESS_LOG     errors (default): log only requests that failed on the
#                                  server (5xx); all: every request (each artifact upload,
#                                  each /health check, the 404s a new experiment causes)
#   TINYTALE_MLFLOW_MODEL_SOURCE_REGEX  model-version sources the registry accepts (default:
#                                  `models:/m-<id>`, `runs:/...` and `mlflow-artifacts:/...`
#                                  without `..`); passed to MLflow as
#                                  MLFLOW_CREATE_MODEL_VERSION_SOURCE_VALIDATION_REGEX.
#   TINYTALE_MLFLOW_AUTH           1/true/yes: basic auth; 0/false/no/empty (default): none
#   TINYTALE_MLFLOW_ADMIN_USER     admin user name (default admin)
#   TINYTALE_MLFLOW_ADMIN_PASSWORD or TINYTALE_MLFLOW_ADMIN_PASSWORD_FILE (a file holding it,
#                                  e.g. a compose secret): required with auth, at least 12
#                                  characters, not MLflow's old default. It creates the admin
#                                  user on the first start (the user database lives in
#                                  $TINYTALE_MLFLOW_HOME/db/basic_auth.db); later starts refuse
#                                  a password that does not match it. To rotate it, change it
#                                  through MLflow's API, then here.
#   TINYTALE_MLFLOW_DEFAULT_PERMISSION  what authenticated users may do with others' resources:
#                                  READ (default), EDIT, MANAGE or NO_PERMISSIONS
#   TINYTALE_MLFLOW_SECRET_KEY(_FILE)   Flask secret for the auth app's CSRF tokens; by default
#                                  a random one per start (all workers inherit it).
# The auth configuration (it holds the admin password) is written at start, mode 600, to a new
# folder under $TMPDIR (default /tmp): never into the image, never into the volumes.
set -euo pipefail

die() {
    printf 'mlflow-server: ERROR: %s\n' "$*" >&2
    exit 2
}
log() { printf 'mlflow-server: %s\n' "$*" >&2; }

[ $# -eq 0 ] || die "takes no arguments (got '$*'); configure it with the environment variables \
listed at the top of $0"

home=${TINYTALE_MLFLOW_HOME:-/mlflow}
host=${TINYTALE_MLFLOW_HOST:-127.0.0.1}
port=${TINYTALE_MLFLOW_PORT:-5000}
workers=${TINYTALE_MLFLOW_WORKERS:-2}
[[ $port =~ ^[0-9]+$ ]] && [ "$port" -ge 1 ] && [ "$port" -le 65535 ] \
    || die "TINYTALE_MLFLOW_PORT='$port' is not a port number (1-65535)"
[[ $workers =~ ^[1-9][0-9]*$ ]] || die "TINYTALE_MLFLOW_WORKERS='$workers' is not a positive number"
access_log=${TINYTALE_MLFLOW_ACCESS_LOG:-errors}
case $access_log in
    errors | all) ;;
    *) die "TINYTALE_MLFLOW_ACCESS_LOG='$access_log' is not 'errors' or 'all'" ;;
esac

# ---- Host header check: always on, always an explicit list --------------------------------
allowed_hosts=${MLFLOW_SERVER_ALLOWED_HOSTS:-}
allowed_hosts=${allowed_hosts//[[:space:]]/}
[ -n "$allowed_hosts" ] || die "MLFLOW_SERVER_ALLOWED_HOSTS is empty: list the Host headers \
clients use, e.g. 'localhost:*,127.0.0.1:*' (the host check protects against DNS rebinding)"
IFS=, read -r -a host_list <<<"$allowed_hosts"
for h in "${host_list[@]}"; do
    [ "$h" != "*" ] || die "MLFLOW_SERVER_ALLOWED_HOSTS contains '*', which turns the Host \
header check off; list the host names instead"
done
case ${MLFLOW_SERVER_DISABLE_SECURITY_MIDDLEWARE:-false} in
    false | False | FALSE | 0 | "") unset MLFLOW_SERVER_DISABLE_SECURITY_MIDDLEWARE ;;
    *) die "MLFLOW_SERVER_DISABLE_SECURITY_MIDDLEWARE is set: this server keeps the Host and CORS checks on" ;;
esac
cors=${MLFLOW_SERVER_CORS_ALLOWED_ORIGINS:-}
case ",${cors//[[:space:]]/}," in
    *,\*,*) die "MLFLOW_SERVER_CORS_ALLOWED_ORIGINS contains '*': list the origins instead" ;;
esac

# MLflow rejects registry sources that do not match (CVE-2025-11201 class of bugs): tinytale
# registers `models:/m-<id>` logged models; runs:/ and mlflow-artifacts:/ are the other forms a
# client of this server produces. No `..` anywhere.
: "${TINYTALE_MLFLOW_MODEL_SOURCE_REGEX:=^(models:/m-[0-9a-f]+|(runs|mlflow-artifacts):/(?!.*\.\.)\S*)$}"
export MLFLOW_CREATE_MODEL_VERSION_SOURCE_VALIDATION_REGEX=$TINYTALE_MLFLOW_MODEL_SOURCE_REGEX
# No GenAI job runner: tinytale never uses it, and it costs two Python processes.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}

# ---- basic auth -------------------------------------------------------------------------------
# Reads VAR or VAR_FILE (not both) into the variable named by $1; empty if neither is set.
read_secret() {
    local out=$1 name=$2 value file_var file
    value=${!name:-}
    file_var=${name}_FILE
    file=${!file_var:-}
    if [ -n "$file" ]; then
        [ -r "$file" ] || die "$file_var='$file' is not a readable file (a compose secret must \
be readable by uid $(id -u))"
        local from_file
        from_file=$(cat -- "$file")
        # Strip one trailing newline/CR (editors add them), nothing else.
        from_file=${from_file%$'\r'}
        if [ -n "$from_file" ]; then
            [ -z "$value" ] || die "both $name and $file_var are set; use one"
            value=$from_file
        fi
    fi
    printf -v "$out" '%s' "$value"
}

auth=${TINYTALE_MLFLOW_AUTH:-0}
case ${auth,,} in
    1 | true | yes | on) auth=1 ;;
    0 | false | no | off | "") auth=0 ;;
    *) die "TINYTALE_MLFLOW_AUTH='$auth' is not 1 or 0" ;;
esac

if [ "$auth" = 1 ]; then
    for v in MLFLOW_AUTH_CONFIG_PATH MLFLOW_AUTH_ADMIN_USERNAME MLFLOW_AUTH_ADMIN_PASSWORD; do
        [ -z "${!v:-}" ] || die "$v is set; this server takes TINYTALE_MLFLOW_ADMIN_USER and \
TINYTALE_MLFLOW_ADMIN_PASSWORD(_FILE) instead"
    done
    admin_user=${TINYTALE_MLFLOW_ADMIN_USER:-admin}
    [[ $admin_user =~ ^[A-Za-z0-9._@-]+$ ]] \
        || die "TINYTALE_MLFLOW_ADMIN_USER='$admin_user' may use only letters, digits and ._@-"
    read_secret admin_password TINYTALE_MLFLOW_ADMIN_PASSWORD
    [ -n "$admin_password" ] || die "TINYTALE_MLFLOW_AUTH=1 needs an admin password: set \
TINYTALE_MLFLOW_ADMIN_PASSWORD or TINYTALE_MLFLOW_ADMIN_PASSWORD_FILE (12+ characters)"
    case ${admin_password,,} in
        password1234 | password | admin | adminadmin1234 | changeme)
            die "the admin password is MLflow's well-known default (or as guessable); choose \
another one" ;;
    esac
    [ ${#admin_password} -ge 12 ] || die "the admin password has ${#admin_password} characters; \
MLflow requires at least 12"
    [[ $admin_password != *$'\n'* ]] || die "the admin password spans several lines"
    # The ini reader strips surrounding blanks, so such a password would not be the one set.
    [[ $admin_password != [[:space:]]* && $admin_password != *[[:space:]] ]] \
        || die "the admin password starts or ends with a blank"
    permission=${TINYTALE_MLFLOW_DEFAULT_PERMISSION:-READ}
    case $permission in
        READ | EDIT | MANAGE | NO_PERMISSIONS) ;;
        *) die "TINYTALE_MLFLOW_DEFAULT_PERMISSION='$permission' is not READ, EDIT, MANAGE or \
NO_PERMISSIONS" ;;
    esac
    read_secret secret_key TINYTALE_MLFLOW_SECRET_KEY
    if [ -z "$secret_key" ]; then
        secret_key=$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))') \
            || die "python3 is needed to make a secret key"
    fi
fi

# ---- runs database ---------------------------------------------------------------------------
database_uri=${TINYTALE_MLFLOW_DATABASE_URI:-}
case $database_uri in
    "" | sqlite:////*) ;;
    postgresql://* | postgresql+psycopg://*)
        # user:password@ in the authority part (before the first / after the scheme).
        authority=${database_uri#*://}
        authority=${authority%%/*}
        [[ $authority != *:*@* ]] || die "TINYTALE_MLFLOW_DATABASE_URI holds a password, which \
anyone who can run \`ps\` or \`docker inspect\` reads; remove it and put it in a file named by \
TINYTALE_MLFLOW_DATABASE_PASSWORD_FILE" ;;
    *) die "TINYTALE_MLFLOW_DATABASE_URI='$database_uri' is neither sqlite:////ABSOLUTE/PATH nor \
postgresql://USER@HOST:PORT/DATABASE; use one of those forms" ;;
esac
database_password=""
if [ -n "${TINYTALE_MLFLOW_DATABASE_PASSWORD_FILE:-}" ] && [[ $database_uri == postgresql* ]]; then
    read_secret database_password TINYTALE_MLFLOW_DATABASE_PASSWORD
fi

command -v mlflow >/dev/null || die "no 'mlflow' on PATH (install mlflow[auth] or use the image)"

# ---- storage (only once every check has passed) ---------------------------------------------
mkdir -p "$home/db" "$home/artifacts" || die "cannot create $home/db and $home/artifacts"
home=$(cd "$home" && pwd -P)
database_uri=${database_uri:-sqlite:///$home/db/mlflow.db}
args=(
    --backend-store-uri "$database_uri"
    --artifacts-destination "${TINYTALE_MLFLOW_ARTIFACTS_DESTINATION:-$home/artifacts}"
    --serve-artifacts
    --host "$host" --port "$port" --workers "$workers"
    --allowed-hosts "$allowed_hosts"
)
[ -z "$cors" ] || args+=(--cors-allowed-origins "$cors")

if [ "$auth" = 1 ] && [ -f "$home/db/basic_auth.db" ]; then
    # MLflow sets the admin password only when it creates the user database; a different one
    # later would be ignored, and trainers holding it would fail with 401 mid-run. Check it.
    mlflow_python=$(dirname -- "$(command -v mlflow)")/python
    [ -x "$mlflow_python" ] || mlflow_python=python3
    rc=0
    check=$(TINYTALE_CHECK_PASSWORD=$admin_password "$mlflow_python" - \
        "$home/db/basic_auth.db" "$admin_user" 2>&1 <<'PY'
import os
import sys

from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

store = SqlAlchemyStore()
store.init_db(f"sqlite:///{sys.argv[1]}")
user, password = sys.argv[2], os.environ["TINYTALE_CHECK_PASSWORD"]
# A user not in the database yet is created with this password when the server starts.
sys.exit(0 if not store.has_user(user) or store.authenticate_user(user, password) else 3)
PY
    ) || rc=$?
    case $rc in
        0) ;;
        3) die "the admin password is not the one admin user '$admin_user' has in \
$home/db/basic_auth.db (MLflow keeps the password the database was created with); use that \
one, or change it with MLflow's AuthServiceClient.update_user_password first" ;;
        *) die "cannot check the admin password against $home/db/basic_auth.db (exit $rc: \
$(printf '%s' "$check" | tail -n 1))" ;;
    esac
fi

# ---- database: password file, schema upgrade (after every check, before serving) ------------
if [ -n "$database_password" ]; then
    # libpq reads the password from here (psycopg, for the upgrade and the server), so it is
    # in no command line and no environment variable.
    umask 077
    pg_dir=$(mktemp -d "${TMPDIR:-/tmp}/tinytale-mlflow-pg.XXXXXX") \
        || die "cannot create a folder under ${TMPDIR:-/tmp} for the database password"
    escaped=${database_password//\\/\\\\}
    printf '*:*:*:*:%s\n' "${escaped//:/\\:}" >"$pg_dir/pgpass"
    umask 022
    export PGPASSFILE=$pg_dir/pgpass
fi
unset TINYTALE_MLFLOW_DATABASE_PASSWORD database_password escaped
# A new MLflow in the image may need a newer schema than the database has (the server refuses
# to start on an out-of-date one); an empty database gets its tables here. Idempotent.
log "upgrading the database schema if needed (${database_uri%%://*})"
upgrade_log=$(mktemp "${TMPDIR:-/tmp}/tinytale-mlflow-db-upgrade.XXXXXX")
mlflow db upgrade "$database_uri" >"$upgrade_log" 2>&1 \
    || { tail -n 20 "$upgrade_log" >&2
         die "\`mlflow db upgrade\` failed on ${database_uri%%://*} (its last lines are above); \
is the database up, and is it one MLflow created?"; }
rm -f "$upgrade_log"
if [ -n "${TINYTALE_MLFLOW_MIGRATE_FROM:-}" ]; then
    # A one-off `docker compose run`: copy an old SQLite database in, then exit (no server).
    mlflow_python=$(dirname -- "$(command -v mlflow)")/python
    [ -x "$mlflow_python" ] || mlflow_python=python3
    exec "$mlflow_python" "$(dirname -- "$(readlink -f -- "$0")")/mlflow-migrate.py" \
        "$TINYTALE_MLFLOW_MIGRATE_FROM" "$database_uri"
fi
if [ "$auth" = 1 ]; then
    umask 077
    conf_dir=$(mktemp -d "${TMPDIR:-/tmp}/tinytale-mlflow-auth.XXXXXX") \
        || die "cannot create a folder under ${TMPDIR:-/tmp} for the auth configuration"
    # configparser would read `%` as interpolation: double it.
    {
        printf '[mlflow]\n'
        printf 'default_permission = %s\n' "$permission"
        printf 'database_uri = sqlite:///%s/db/basic_auth.db\n' "$home"
        printf 'admin_username = %s\n' "$admin_user"
        printf 'admin_password = %s\n' "${admin_password//%/%%}"
        printf 'authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n'
    } >"$conf_dir/basic_auth.ini"
    umask 022
    export MLFLOW_AUTH_CONFIG_PATH=$conf_dir/basic_auth.ini
    export MLFLOW_FLASK_SERVER_SECRET_KEY=$secret_key
    args+=(--app-name basic-auth)
    log "basic auth on (admin user '$admin_user'; users in $home/db/basic_auth.db)"
fi
if [ "$access_log" = errors ]; then
    # uvicorn logs every request: with a trainer uploading artifacts and compose's healthcheck
    # calling /health, that was three lines in four of `docker compose up`. Keep the requests
    # the server failed (5xx: MLflow answers an MlflowException with INTERNAL_ERROR without
    # logging it, so the access line is its only trace) and uvicorn's own messages, through a
    # log config like MLflow's (mlflow/server/uvicorn_log_config.yaml) with a status filter.
    # 4xx are left out: every new run causes some (a 404 looking up a new experiment, a 400
    # for a champion alias not set yet), and the client that made the request reports them.
    log_dir=$(mktemp -d "${TMPDIR:-/tmp}/tinytale-mlflow-log.XXXXXX") \
        || die "cannot create a folder under ${TMPDIR:-/tmp} for the log configuration"
    [[ $log_dir != *[[:space:]\'\"]* ]] || die "TMPDIR='${TMPDIR:-/tmp}' holds blanks or quotes; \
use a plain path"
    cat >"$log_dir/tinytale_access_log.py" <<'PY'
"""uvicorn access-log filter of tinytale's MLflow server (written by mlflow-server.sh)."""

import logging


class ServerErrors(logging.Filter):
    """Pass requests answered with a 5xx status; drop all others."""

    def filter(self, record):
        # uvicorn's access record: args = (client, method, path, http version, status code)
        args = record.args
        if isinstance(args, tuple) and len(args) == 5:
            try:
                return int(args[4]) >= 500
            except (TypeError, ValueError):
                pass
        return True  # a record of another shape: show it rather than lose it
PY
    cat >"$log_dir/uvicorn-log.json" <<'JSON'
{
  "version": 1,
  "disable_existing_loggers": false,
  "filters": {"server_errors": {"()": "tinytale_access_log.ServerErrors"}},
  "formatters": {
    "default": {"()": "uvicorn.logging.DefaultFormatter",
                "fmt": "%(asctime)s %(levelprefix)s %(message)s", "datefmt": "%Y/%m/%d %H:%M:%S"},
    "access": {"()": "uvicorn.logging.AccessFormatter",
               "fmt": "%(asctime)s %(levelprefix)s %(client_addr)s - \"%(request_line)s\" %(status_code)s",
               "datefmt": "%Y/%m/%d %H:%M:%S"}
  },
  "handlers": {
    "default": {"formatter": "default", "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr"},
    "access": {"formatter": "access", "class": "logging.StreamHandler",
               "stream": "ext://sys.stdout", "filters": ["server_errors"]}
  },
  "loggers": {
    "uvicorn": {"handlers": ["default"], "level": "INFO"},
    "uvicorn.access": {"handlers": ["access"], "level": "INFO", "propagate": false}
  }
}
JSON
    # uvicorn's workers import the filter by name: they inherit this search path.
    export PYTHONPATH=$log_dir${PYTHONPATH:+:$PYTHONPATH}
    args+=(--uvicorn-opts "--log-config $log_dir/uvicorn-log.json")
fi
# Each uvicorn worker warns at import that MLflow uses a deprecated starlette module: two lines
# per worker at every start that say nothing about this server.
export PYTHONWARNINGS="ignore:starlette.middleware.wsgi is deprecated:UserWarning${PYTHONWARNINGS:+,$PYTHONWARNINGS}"

# The server process needs none of these; keep them out of its environment.
unset TINYTALE_MLFLOW_ADMIN_PASSWORD TINYTALE_MLFLOW_SECRET_KEY admin_password secret_key

log "serving $home on $host:$port for hosts $allowed_hosts"
exec mlflow server "${args[@]}"
