#!/bin/sh
# Entrypoint of the trainer images: runs its arguments (`tinytale ...`, or `torchrun ... -m
# tinytale ...` in the GPU service) after two steps. MLflow clients read the tracking password
# only from MLFLOW_TRACKING_PASSWORD; with basic auth on, compose may hand it over as a secret
# file instead (MLFLOW_TRACKING_PASSWORD_FILE), which is read here so that it never has to be
# in the container's configuration. An empty file (compose's default) changes nothing.
set -eu
file=${MLFLOW_TRACKING_PASSWORD_FILE:-}
if [ -z "${MLFLOW_TRACKING_PASSWORD:-}" ] && [ -n "$file" ]; then
    if [ -f "$file" ] && [ ! -s "$file" ]; then
        # Empty: nothing to read. Compose's default docker/no-secret may be unreadable to this
        # uid where the checkout was made under a strict umask (077); auth is off then anyway.
        :
    elif [ ! -r "$file" ]; then
        echo "tinytale-entrypoint: ERROR: MLFLOW_TRACKING_PASSWORD_FILE='$file' is not readable" \
            "by uid $(id -u)" >&2
        exit 2
    else
        password=$(cat "$file")
        if [ -n "$password" ]; then
            MLFLOW_TRACKING_PASSWORD=$password
            export MLFLOW_TRACKING_PASSWORD
        fi
    fi
fi
unset MLFLOW_TRACKING_PASSWORD_FILE file password
# The commit the image was built from (docker/git-commit.py at build time): tinytale tags runs
# with it where git cannot tell, and a container has no git and no .git.
commit_file=/usr/local/share/tinytale/git-commit
if [ -z "${TINYTALE_GIT_COMMIT:-}" ] && [ -s "$commit_file" ]; then
    TINYTALE_GIT_COMMIT=$(cat "$commit_file")
    export TINYTALE_GIT_COMMIT
fi
unset commit_file
exec "$@"
