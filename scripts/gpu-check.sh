#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py) from a bare copy of the working tree on a GPU machine:
# its own PyTorch, no MLflow, no network, no installs. Writes one JSON file: the first
# argument, else $OUT/gpu-check.json where $OUT is set, else ./gpu-check.json. Without CUDA
# it runs the CPU fallback (what the test suite runs). Exit code 1 when a check failed.
#   scripts/gpu-check.sh [OUT.json] [--steps N] [--only CHECK...]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:+$OUT/}gpu-check.json}
shift || true
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import torch, numpy, yaml' 2>/dev/null; then
  echo "gpu-check needs torch, numpy and PyYAML importable by $PYTHON (set PYTHON=...)" >&2
  exit 2
fi
# 7 minutes of checks at most (--budget-s), the whole script killed at 7 min 50 s.
exec timeout 470 "$PYTHON" bench/gpu_check.py --out "$out" --budget-s 420 "$@"
