#!/usr/bin/env bash
# One command from a fresh clone to a full test run: creates .venv, installs the CPU build
# of torch and tinytale with its test tools, headless Chromium for the MLflow UI test, sets
# up Docker (scripts/docker-offline.sh: the engine and compose v2 from Debian packages if
# missing, a local base image, a wheelhouse; needs root or sudo) so the compose end-to-end
# test runs for real, and runs pytest.
# TINYTALE_DOCKER=0 skips the Docker set-up (the e2e test then skips, except under CI=true,
# where a missing engine fails loudly).
# Extra arguments go to pytest, e.g. `scripts/test.sh -k cli -x`.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# The CPU wheel first: a bare `pip install .` would pull torch's multi-GB CUDA build. Online,
# TINYTALE_TORCH_INDEX=https://download.pytorch.org/whl/cpu gets the CPU build from PyTorch's
# index; unset, pip's own configuration decides (this project's machines have the CPU wheel).
.venv/bin/python -m pip install -q ${TINYTALE_TORCH_INDEX:+--index-url "$TINYTALE_TORCH_INDEX"} \
  "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]"

# Headless Chromium and its driver for the MLflow UI test (Debian's packages; root or sudo).
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq \
      chromium chromium-driver >/dev/null; } \
    || echo "could not install chromium: tests/e2e/test_ui_browser.py will skip (fail under CI)" >&2
fi

if [ "${TINYTALE_DOCKER:-1}" != "0" ]; then
  # Prints `export NAME=value` lines for the e2e test (base image, wheelhouse, ...).
  # Captured first: `eval "$(...)"` would hide the script's failure.
  # Bounded, so a stuck download or engine fails the run instead of using up CI's time.
  exports=$(timeout 1200 bash scripts/docker-offline.sh) \
    || { echo "scripts/docker-offline.sh failed or ran past 20 min (see its output above)" >&2; exit 1; }
  eval "$exports"
fi

# The whole run is bounded too (each test is, by pytest-timeout): past an hour pytest gets
# SIGINT, which stops it with the usual summary of what passed, failed and was running, well
# inside CI's 90 minutes. A run on 2 cores takes about 15 minutes from nothing (images and the
# CUDA wheels included), about 9 with them cached.
exec timeout --signal=INT --kill-after=60 3600 .venv/bin/python -m pytest "$@"
