#!/bin/sh
# pip for the image's venv: `pip.sh install|wheel ARGS...`. When the WHEELHOUSE build argument
# names a folder, pip reads only that folder (scripts/docker-offline.sh fills it): --no-index
# wins over any --index-url given by the caller, so the Dockerfiles need no second code path.
set -eu
command=$1
shift
if [ -n "${WHEELHOUSE:-}" ]; then
    set -- --no-index --find-links "$WHEELHOUSE" "$@"
fi
exec /opt/venv/bin/pip "$command" --no-cache-dir --disable-pip-version-check "$@"
