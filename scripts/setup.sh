#!/usr/bin/env bash
# Create .venv and install the service (the README, CI and docker/Dockerfile all run this).
#
# The pinned torch goes in first so that the package's own `torch>=2.6` range is already met
# (a bare `torch` requirement would pull a multi-GB CUDA build on x86-64 Linux).
#   TORCH_SPEC       torch requirement to pre-install        (default torch==2.13.0)
#   TORCH_INDEX_URL  wheel index for torch, e.g. PyTorch's CPU or CUDA index (default: pip's)
#   EXTRAS           extras of this package                  (default dev,hf)
#   EDITABLE         1: editable install (development), 0: regular install (images)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${EXTRAS:-dev,hf}
EDITABLE=${EDITABLE:-1}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  .venv/bin/python -m pip install --quiet --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"
else
  .venv/bin/python -m pip install --quiet "$TORCH_SPEC"
fi
if [ "$EDITABLE" = 1 ]; then
  .venv/bin/python -m pip install --quiet -e ".[${EXTRAS}]"
else
  .venv/bin/python -m pip install --quiet ".[${EXTRAS}]"
fi
