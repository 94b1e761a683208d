#!/usr/bin/env bash
# One command on a fresh machine: create the environment, install, serve on 127.0.0.1:8000.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=${EXTRAS:-dev} bash scripts/setup.sh
exec .venv/bin/dpo-service serve "$@"
