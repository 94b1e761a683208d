# Verbs: dev (install), proto (regenerate stubs), lint, test, check (lint + test), serve, bench,
# bench-precision (fp32 vs bf16 autocast), bench-hf (an hf: Llama vs the built-in model),
# bench-reference (reference log-prob cache: cold vs warm epoch, lookup overhead),
# bench-sessions (LoRA sessions vs full-parameter steps, memory per session, 1/4/16 sessions),
# bench-distributed (the service under torchrun: world size 1 vs 2, DDP and FSDP2),
# gpu-check (CUDA tests + precision bench on a GPU).
PY := .venv/bin/python
export PYTHONHASHSEED := 0

.PHONY: dev proto proto-check buf-lint compose-check lint test test-fast check serve bench \
	bench-precision bench-hf bench-reference bench-sessions bench-distributed gpu-check

dev:
	bash scripts/setup.sh

proto:
	bash scripts/gen_proto.sh

proto-check: proto
	@test -z "$$(git status --porcelain -- service/dpo_service/api/grpc/gen)" || (git status --short -- service/dpo_service/api/grpc/gen; echo "generated stubs are stale: run make proto"; exit 1)

buf-lint:
	cd .ci/node && npx --no-install buf lint ../..

compose-check:
	docker compose config --quiet

lint:
	$(PY) -m ruff check service tests bench examples scripts
	$(PY) -m ruff format --check service tests bench examples scripts
	$(PY) -m mypy

test:
	$(PY) -m pytest -q

test-fast:
	$(PY) -m pytest -q -m "not slow"

check: lint proto-check buf-lint compose-check test

serve:
	.venv/bin/dpo-service serve

bench:
	$(PY) bench/run.py

bench-precision:
	$(PY) bench/precision.py

bench-hf:
	$(PY) bench/hf.py

bench-reference:
	$(PY) bench/reference_cache.py

bench-sessions:
	$(PY) bench/sessions.py

bench-distributed:
	$(PY) bench/distributed.py

gpu-check:
	bash bench/gpu_check.sh
