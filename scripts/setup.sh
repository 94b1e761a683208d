#!/usr/bin/env bash
# Create .venv and install the service with its dev tools.
# The pinned CPU torch goes in first so that the package's `torch>=2.6` range is already met
# (a bare `torch` requirement would pull a multi-GB CUDA build). Override with TORCH_SPEC.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${EXTRAS:-dev}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "$TORCH_SPEC"
.venv/bin/python -m pip install --quiet -e ".[${EXTRAS}]"
