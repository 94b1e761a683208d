#!/usr/bin/env bash
# Create .venv and install the service (the README, CI and docker/Dockerfile all run this).
#
# The pinned torch goes in first so that the package's own `torch>=2.6` range is already met
# (a bare `torch` requirement would pull a multi-GB CUDA build on x86-64 Linux).
#   TORCH_SPEC       torch requirement to pre-install        (default torch==2.13.0)
#   TORCH_INDEX_URL  wheel index for torch, e.g. PyTorch's CPU or CUDA index (default: pip's)
#   EXTRAS           extras of this package                  (default dev,hf)
#   EDITABLE         1: editable install (development), 0: regular install (images)
#   DEPS_ONLY        1: torch, then the dependencies pyproject.toml lists (project.dependencies
#                    and the EXTRAS), not the package itself; needs only pyproject.toml and this
#                    script (the image's dependency layer, cached across code changes)
#   NO_DEPS          1: only the package itself (pip --no-deps) into the existing .venv, then
#                    `pip check`; the image's second step, after DEPS_ONLY=1
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${EXTRAS:-dev,hf}
EDITABLE=${EDITABLE:-1}
DEPS_ONLY=${DEPS_ONLY:-0}
NO_DEPS=${NO_DEPS:-0}
if [ "$DEPS_ONLY" = 1 ] && [ "$NO_DEPS" = 1 ]; then
  echo "setup.sh: DEPS_ONLY=1 and NO_DEPS=1 exclude each other" >&2
  exit 2
fi
if [ "$NO_DEPS" = 1 ]; then
  if [ "$EDITABLE" = 1 ]; then
    .venv/bin/python -m pip install --quiet --no-deps -e ".[${EXTRAS}]"
  else
    .venv/bin/python -m pip install --quiet --no-deps ".[${EXTRAS}]"
  fi
  .venv/bin/python -m pip check
  exit 0
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  .venv/bin/python -m pip install --quiet --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"
else
  .venv/bin/python -m pip install --quiet "$TORCH_SPEC"
fi
if [ "$DEPS_ONLY" = 1 ]; then
  requirements=$(mktemp)
  trap 'rm -f "$requirements"' EXIT
  EXTRAS="$EXTRAS" .venv/bin/python - >"$requirements" <<'EOF'
import os
import sys

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the copy pip vendors
    from pip._vendor import tomli as tomllib

with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
optional = project.get("optional-dependencies", {})
requirements = list(project.get("dependencies", []))
for extra in filter(None, (e.strip() for e in os.environ["EXTRAS"].split(","))):
    if extra not in optional:
        sys.exit(f"setup.sh: pyproject.toml has no extra {extra!r}")
    requirements += optional[extra]
print("\n".join(requirements))
EOF
  .venv/bin/python -m pip install --quiet -r "$requirements"
  exit 0
fi
if [ "$EDITABLE" = 1 ]; then
  .venv/bin/python -m pip install --quiet -e ".[${EXTRAS}]"
else
  .venv/bin/python -m pip install --quiet ".[${EXTRAS}]"
fi
