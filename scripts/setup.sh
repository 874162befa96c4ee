#!/usr/bin/env bash
# Creates .venv in the repository root and installs moe-serve into it.
# torch is installed first and pinned (2.13.0, CPU build) so that nothing pulls the CUDA wheels.
# Usage: scripts/setup.sh [EXTRA]   (EXTRA: test | triton)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
extra=${1:-}
.venv/bin/python -m pip install -q -e ".${extra:+[$extra]}"
