#!/usr/bin/env bash
# GPU check for the precision policy (README "Precision"): on a CUDA machine, runs the CUDA
# tests and the precision benchmark with DPO_DEVICE=cuda for float32 and bfloat16, and prints
# the tables. Run from anywhere:
#
#   bash bench/gpu_check.sh            # or: make gpu-check
#   PYTHON=/path/to/python bash bench/gpu_check.sh
#
# Needs a CUDA build of torch (the CPU wheel cannot see the GPU: install torch from PyTorch's
# CUDA wheel index, as docker/Dockerfile does with TORCH_INDEX_URL). Exits 2 without a usable
# CUDA device, non-zero when a test fails; the report is also written to
# $GPU_CHECK_OUT (default bench/gpu_check.md).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
OUT="${GPU_CHECK_OUT:-$ROOT/bench/gpu_check.md}"

if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
else
  echo "gpu_check: nvidia-smi not found (no NVIDIA driver?)" >&2
fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda build:", torch.version.cuda)' >&2 || true
  echo "gpu_check: torch.cuda.is_available() is False: no CUDA device, or a CPU-only torch" >&2
  exit 2
fi
"$PY" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {p.name}, {p.total_memory / 2**30:.0f} GiB, bf16 {torch.cuda.is_bf16_supported()}")'

echo "== CUDA tests (pytest -m cuda) and the precision tests on this machine"
# The cuda-marked tests run the engine on the GPU; the rest of test_precision.py and the
# library's float32-reduction tests check the policy itself (CPU) in the same torch build.
"$PY" -m pytest -q -rs -s -m cuda tests/dpo_service/test_precision.py \
  tests/dpo_service/test_step_guard.py
"$PY" -m pytest -q -rs tests/dpo_service/test_precision.py tests/dpo_service/test_step_guard.py \
  tests/modern_llm/alignment/test_reductions_float32.py

echo "== precision benchmark, DPO_DEVICE=cuda, float32 and bfloat16"
DPO_DEVICE=cuda "$PY" bench/precision.py --dtypes float32,bfloat16 --rounds 5 --markdown "$OUT"
echo "gpu_check: report written to $OUT"
