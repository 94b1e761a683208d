#!/usr/bin/env bash
# One command on a fresh machine: create the environment, install, run every check and test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/dev_tools.sh
make -k check
