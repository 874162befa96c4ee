#!/usr/bin/env bash
# One command on a fresh machine: install, then run the main job: serve the built-in demo model on a
# local Ray cluster over HTTP (OpenAI API) and gRPC until Ctrl-C. Extra arguments go to `moe-serve up`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/moe-serve up "$@"
