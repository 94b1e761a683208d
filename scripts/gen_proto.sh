#!/usr/bin/env bash
# Regenerate the Python gRPC stubs from proto/dpo/v1/dpo_service.proto into
# service/dpo_service/api/grpc/gen/ (committed). Deterministic: the same grpcio-tools version
# gives byte-identical files, so CI can run this and `git diff --exit-code`.
#
#   scripts/gen_proto.sh            # uses $PYTHON, else .venv/bin/python, else python3
#   GEN_OUT=/tmp/x scripts/gen_proto.sh   # write somewhere else (used by the tests)
#
# The generated *_pb2_grpc.py imports its *_pb2 module as `dpo.v1.dpo_service_pb2`; that
# import is rewritten to a relative one so no top-level `dpo` package is ever needed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# The stubs embed the generator's version; pin it so regeneration is reproducible.
GRPC_TOOLS_VERSION="${GRPC_TOOLS_VERSION:-1.85.1}"

if [[ -n "${PYTHON:-}" ]]; then
  PY="$PYTHON"
elif [[ -x "$ROOT/.venv/bin/python" ]]; then
  PY="$ROOT/.venv/bin/python"
else
  PY="python3"
fi

have="$("$PY" -c 'import importlib.metadata as m; print(m.version("grpcio-tools"))' 2>/dev/null || true)"
if [[ -z "$have" ]]; then
  echo "gen_proto.sh: grpcio-tools is not installed for $PY (pip install grpcio-tools==$GRPC_TOOLS_VERSION)" >&2
  exit 1
fi
if [[ "$have" != "$GRPC_TOOLS_VERSION" ]]; then
  echo "gen_proto.sh: grpcio-tools $have found, $GRPC_TOOLS_VERSION expected (the generated files" >&2
  echo "  embed the version). pip install grpcio-tools==$GRPC_TOOLS_VERSION, or set" >&2
  echo "  GRPC_TOOLS_VERSION=$have to regenerate with it anyway." >&2
  exit 1
fi

OUT="${GEN_OUT:-service/dpo_service/api/grpc/gen}"  # GEN_OUT: write elsewhere (tests compare)
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

"$PY" -m grpc_tools.protoc \
  --proto_path=proto \
  --python_out="$TMP" \
  --pyi_out="$TMP" \
  --grpc_python_out="$TMP" \
  dpo/v1/dpo_service.proto

mkdir -p "$OUT"
for f in dpo_service_pb2.py dpo_service_pb2.pyi dpo_service_pb2_grpc.py; do
  # `from dpo.v1 import dpo_service_pb2 as ...` -> `from . import dpo_service_pb2 as ...`
  sed -e 's/^from dpo\.v1 import /from . import /' "$TMP/dpo/v1/$f" > "$OUT/$f"
done

if grep -n '^from dpo\b\|^import dpo\b' "$OUT"/*.py "$OUT"/*.pyi; then
  echo "gen_proto.sh: an absolute 'dpo' import is left in the generated code" >&2
  exit 1
fi

cat > "$OUT/__init__.py" <<'PY'
"""Python stubs generated from ``proto/dpo/v1/dpo_service.proto`` (package ``dpo.v1``).

Do not edit: regenerate with ``scripts/gen_proto.sh`` (``make proto``).
"""
PY
echo "gen_proto.sh: wrote $OUT (grpcio-tools $have)"
