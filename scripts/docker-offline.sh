#!/usr/bin/env bash
# Docker for tinytale on a Debian host with no engine, no image registry and no TLS to PyPI
# from inside containers (CI, air-gapped machines). Online users do not need this script:
# `docker compose up` builds everything from the official images and PyPI.
#
# Usage (as root, or a user allowed to sudo):
#   eval "$(scripts/docker-offline.sh)"   # every step below, then print the variables compose needs
#   docker compose up                      # builds from the local base image and the wheelhouse
#
#   scripts/docker-offline.sh STEP...      # only these steps: engine compose base postgres
#                                          # wheels wheels-cuda env
#
# In a `set -e` script, `eval "$(...)"` hides a failure of the script (eval of nothing succeeds);
# there, write `exports=$(scripts/docker-offline.sh)` and then `eval "$exports"`.
#
# Steps (each one idempotent; a step whose result already exists is skipped):
#   engine   apt-get install docker.io if dockerd is missing; start dockerd in the background
#            if `docker info` does not answer (log: $TINYTALE_DOCKERD_LOG).
#   compose  the compose v2 plugin from Debian trixie's `docker-compose` package, fetched with a
#            throw-away apt configuration (the host's apt sources are not changed).
#   base     a Debian bookworm image with python3 + venv, made by debootstrap (installed with
#            apt-get if missing) and `docker import`, tagged $TINYTALE_LOCAL_BASE_IMAGE
#            (skipped when that tag exists).
#   postgres the database image: PostgreSQL 15 (the major version Debian 12 ships, and the one
#            compose.yaml names for online users, `postgres:15`) from bookworm's packages on top
#            of the base image (docker/postgres.Dockerfile), tagged
#            $TINYTALE_LOCAL_POSTGRES_IMAGE (rebuilt from the build cache when it exists).
#   wheels   docker/wheels/: every wheel the cpu and MLflow images install (torch CPU, the
#            pinned trainer and server requirements, the build backend), re-downloaded only
#            when their docker/requirements-*.txt change. The images read it as build context.
#   wheels-cuda  docker/wheels-cuda/: torch with CUDA and NVIDIA's libraries for the cuda
#            target (~3 GB; only that target copies it). Not a default step: run it before
#            `docker compose --profile gpu build` (CI does).
#   env      print `export ...` lines for compose (stdout); everything else goes to stderr.
#
# Every failure (no apt-get, dockerd not answering, a download failing) exits non-zero with one
# ERROR line, so CI stops loudly instead of skipping the container tests.
#
# Environment: TINYTALE_LOCAL_BASE_IMAGE (default tinytale-base:bookworm) names the base image,
# TINYTALE_DEBIAN_MIRROR (default: the host's Debian mirror) serves debootstrap and the compose
# package, TINYTALE_TORCH_CPU_INDEX (default the PyTorch CPU index) the torch wheel; pip's own
# configuration (PIP_INDEX_URL, PIP_FIND_LINKS, ...) applies to the downloads.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
base_image=${TINYTALE_LOCAL_BASE_IMAGE:-tinytale-base:bookworm}
postgres_image=${TINYTALE_LOCAL_POSTGRES_IMAGE:-tinytale-postgres:15}
dockerd_log=${TINYTALE_DOCKERD_LOG:-/var/log/tinytale-dockerd.log}
wheel_dir=$repo/docker/wheels
python_version=3.11
torch_cpu_index=${TINYTALE_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}

log() { printf '[docker-offline] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# Run one step and report how long it took (the numbers are what CI logs show).
timed() {
    local start=$SECONDS
    "$@"
    log "$1: done in $((SECONDS - start)) s"
}

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"
    elif command -v sudo >/dev/null; then sudo "$@"
    else die "'$*' needs root and sudo is not installed"
    fi
}

debian_mirror() {
    if [ -n "${TINYTALE_DEBIAN_MIRROR:-}" ]; then echo "$TINYTALE_DEBIAN_MIRROR"; return; fi
    local uri
    # The first Debian archive in the host's apt sources (deb822 `URIs:` or one-line `deb`).
    uri=$(grep -hE '^[[:space:]]*(URIs:|deb )' /etc/apt/sources.list /etc/apt/sources.list.d/* \
        2>/dev/null | grep -oE 'https?://[^ ]+/debian/?( |$)' | head -n1 | tr -d ' ' || true)
    echo "${uri:-http://deb.debian.org/debian}"
}

apt_install() {
    command -v apt-get >/dev/null || die "$* must be installed, and there is no apt-get here"
    log "installing $* with apt-get"
    as_root apt-get update -qq >/dev/null
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

step_engine() {
    if docker info >/dev/null 2>&1; then log "engine: a Docker engine answers"; return; fi
    command -v dockerd >/dev/null || apt_install docker.io
    if ! docker info >/dev/null 2>&1; then
        log "engine: starting dockerd (log: $dockerd_log)"
        # Fully detached: `setsid --fork` returns at once, and no descendant keeps this
        # script's stdout open. Callers read that stdout with `$(...)`, which waits for every
        # writer to close it; a dockerd holding it would block them forever.
        as_root setsid --fork sh -c "exec dockerd >>'$dockerd_log' 2>&1" </dev/null >/dev/null 2>&1
        for _ in $(seq 60); do
            docker info >/dev/null 2>&1 && break
            sleep 1
        done
    fi
    if ! docker info >/dev/null 2>&1; then
        tail -n 20 "$dockerd_log" >&2 || true
        die "dockerd did not answer within 60 s; see $dockerd_log"
    fi
    log "engine: $(docker version --format 'server {{.Server.Version}}')"
}

step_compose() {
    if docker compose version >/dev/null 2>&1; then
        log "compose: $(docker compose version --short) already installed"; return
    fi
    local tmp plugins
    tmp=$(mktemp -d)
    mkdir -p "$tmp/lists/partial" "$tmp/archives/partial"
    cat >"$tmp/sources.list" <<EOF
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $(debian_mirror) trixie main
EOF
    local apt_opts=(-o "Dir::Etc::SourceList=$tmp/sources.list" -o Dir::Etc::SourceParts=/dev/null
        -o "Dir::State::Lists=$tmp/lists" -o "Dir::Cache::Archives=$tmp/archives"
        -o APT::Sandbox::User=root)
    log "compose: fetching docker-compose v2 from Debian trixie (host apt config untouched)"
    apt-get "${apt_opts[@]}" update -qq >&2
    (cd "$tmp" && apt-get "${apt_opts[@]}" download docker-compose >&2)
    dpkg -x "$tmp"/docker-compose_*.deb "$tmp/pkg"
    plugins=${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins
    mkdir -p "$plugins"
    install -m 0755 "$tmp/pkg/usr/libexec/docker/cli-plugins/docker-compose" "$plugins/"
    rm -rf "$tmp"
    log "compose: $(docker compose version --short) installed in $plugins"
}

step_base() {
    if docker image inspect "$base_image" >/dev/null 2>&1; then
        log "base: $base_image exists"; return
    fi
    command -v debootstrap >/dev/null || apt_install debootstrap
    local rootfs
    rootfs=$(mktemp -d)
    log "base: debootstrap bookworm into $rootfs"
    as_root debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$rootfs" "$(debian_mirror)" >"$rootfs.log" 2>&1 \
        || { tail -n 20 "$rootfs.log" >&2; die "debootstrap failed (log: $rootfs.log)"; }
    as_root rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    as_root tar -C "$rootfs" -c . | docker import -c 'ENV LANG=C.UTF-8' -c 'CMD ["python3"]' \
        - "$base_image" >/dev/null
    as_root rm -rf "$rootfs"
    log "base: $base_image is $(docker image inspect -f '{{.Size}}' "$base_image") bytes"
}

step_postgres() {
    # Built every time: the layers are cached (about 1 s), and an edited entrypoint is taken.
    docker image inspect "$base_image" >/dev/null 2>&1 \
        || die "postgres: the base image $base_image is missing; run the base step first"
    log "postgres: building $postgres_image from Debian's postgresql-15"
    # The build's apt-get reaches the Debian mirror over plain HTTP (no TLS to trust).
    docker build --quiet --file "$repo/docker/postgres.Dockerfile" \
        --build-arg "BASE_IMAGE=$base_image" --tag "$postgres_image" "$repo" >/dev/null \
        || die "building $postgres_image failed (see the build output above)"
}

# Wheels for the images (Linux, CPython 3.11, this machine's architecture), not the host: every
# manylinux tag that Debian bookworm's glibc (2.36, the base images') accepts.
image_platforms() {
    local arch glibc
    arch=$(uname -m)
    for glibc in $(seq 36 -1 5); do printf -- '--platform manylinux_2_%s_%s ' "$glibc" "$arch"; done
    printf -- '--platform manylinux2014_%s --platform manylinux2010_%s --platform manylinux1_%s ' \
        "$arch" "$arch" "$arch"
    printf -- '--platform linux_%s --only-binary=:all: --python-version %s --implementation cp' \
        "$arch" "$python_version"
}

# fill_wheelhouse DIR REQUIREMENTS... -- DOWNLOAD_STEP...: runs each download step (a function
# name) unless DIR/.key already matches the requirements files' content.
fill_wheelhouse() {
    local dir=$1 reqs=() key
    shift
    while [ "$1" != "--" ]; do reqs+=("$1"); shift; done
    shift
    key=$(cat "${reqs[@]}" | sha256sum | cut -d' ' -f1)
    if [ "$(cat "$dir/.key" 2>/dev/null)" = "$key" ]; then
        log "wheels: $dir is up to date"; return
    fi
    python3 -m pip --version >/dev/null 2>&1 || die "python3 -m pip is needed for the wheelhouse"
    rm -f "$dir"/*.whl "$dir/.key"
    log "wheels: downloading into $dir"
    local step
    for step in "$@"; do "$step" "$dir"; done
    echo "$key" >"$dir/.key"
    log "wheels: $(find "$dir" -name '*.whl' | wc -l) wheels, $(du -sh "$dir" | cut -f1)"
}

download_torch_cpu() {
    # torch from the PyTorch CPU index (PyPI's Linux torch is the multi-GB CUDA build); its
    # dependencies are pinned in requirements-trainer.txt and come from PyPI below.
    # shellcheck disable=SC2046  # image_platforms prints options to split
    pip_download "$1" --no-deps --retries 1 --index-url "$torch_cpu_index" \
        -r "$repo/docker/requirements-torch.txt" $(image_platforms)
    ls "$1"/torch-*+cpu-*.whl >/dev/null 2>&1 \
        || die "no CPU build of torch was downloaded (is $torch_cpu_index reachable?)"
}

download_cpu_images() {
    # shellcheck disable=SC2046
    pip_download "$1" -r "$repo/docker/requirements-trainer.txt" \
        -r "$repo/docker/requirements-mlflow.txt" -r "$repo/docker/requirements-build.txt" \
        $(image_platforms)
}

download_cuda() {
    # shellcheck disable=SC2046
    pip_download "$1" -r "$repo/docker/requirements-cuda.txt" $(image_platforms)
    ls "$1"/torch-*.whl >/dev/null 2>&1 || die "no torch wheel with CUDA was downloaded"
}

step_wheels() {
    fill_wheelhouse "$wheel_dir" "$repo"/docker/requirements-{torch,trainer,mlflow,build}.txt \
        -- download_torch_cpu download_cpu_images
}

step_wheels_cuda() {
    fill_wheelhouse "$repo/docker/wheels-cuda" "$repo/docker/requirements-cuda.txt" \
        -- download_cuda
}

pip_download() {
    local dest=$1
    shift
    # Drop the warnings of pip configurations that list missing local indexes; keep the rest.
    python3 -m pip download --quiet --dest "$dest" "$@" 2>&1 \
        | { grep -v 'is ignored: it is neither a file nor a directory' || true; } >&2
}

step_env() {
    # What compose.yaml reads for its build arguments (see the `args:` there).
    echo "export TINYTALE_BASE_IMAGE=$base_image"
    echo "export TINYTALE_WHEELHOUSE=/wheels"
    echo "export TINYTALE_POSTGRES_IMAGE=$postgres_image"
}

steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(engine compose base postgres wheels env)
for s in "${steps[@]}"; do
    case $s in
        engine | compose | base | postgres | wheels) timed "step_$s" ;;
        wheels-cuda) timed step_wheels_cuda ;;
        env) step_env ;;
        *) die "unknown step '$s' (steps: engine compose base postgres wheels wheels-cuda env)" ;;
    esac
done
