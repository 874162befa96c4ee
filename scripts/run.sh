#!/usr/bin/env bash
# One command on a fresh machine: install, then run the main job (the built-in demo model).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/moe-serve generate --prompt "def fibonacci(n):" --max-tokens 48 --seed 0 "$@"
