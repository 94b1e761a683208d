# Verbs: dev (install), proto (regenerate stubs), lint, test, check (lint + test), serve, bench.
PY := .venv/bin/python
export PYTHONHASHSEED := 0

.PHONY: dev proto proto-check lint typecheck test test-fast check serve bench node

dev:
	bash scripts/setup.sh

proto:
	bash scripts/gen_proto.sh

proto-check: proto
	git diff --exit-code -- service/dpo_service/grpc_gen || (echo "generated stubs are stale: run make proto" && exit 1)

lint:
	$(PY) -m ruff check service tests bench
	$(PY) -m ruff format --check service tests bench
	$(PY) -m mypy

test:
	$(PY) -m pytest -q

test-fast:
	$(PY) -m pytest -q -m "not slow"

check: lint test

serve:
	.venv/bin/dpo-service serve

bench:
	$(PY) bench/run.py
