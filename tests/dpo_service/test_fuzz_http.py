"""Schemathesis against the live server's own OpenAPI schema: every endpoint, with and without
the API key. No 5xx, no response outside the documented schema, and the model only moves for
valid keyed train calls (counted exactly)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
import schemathesis.specs.openapi.checks
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import CHECKS

from conftest import API_KEY, ServerThread, running_server

pytestmark = pytest.mark.slow

TRAINED_VERSIONS: set[int] = set()
STATE: dict[str, Any] = {}


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[ServerThread]:
    with running_server(enable_grpc=False, max_pairs_per_request=8, request_timeout_s=30) as srv:
        STATE["start_version"] = srv.version
        yield srv
        # every version step must come from an acknowledged, keyed train call
        assert srv.version - STATE["start_version"] == len(TRAINED_VERSIONS)


_CHECK_NAMES = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
)
CHECK_FUNCS = [c for c in CHECKS.get_all() if getattr(c, "__name__", "") in _CHECK_NAMES]


def test_checks_are_the_ones_we_meant() -> None:
    assert sorted(c.__name__ for c in CHECK_FUNCS) == sorted(_CHECK_NAMES)


FUZZ_SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)


def _call(case: Any, server: ServerThread, *, keyed: bool) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"} if keyed else {}
    response = case.call_and_validate(
        base_url=server.http_url, headers=headers, checks=CHECK_FUNCS, timeout=60
    )
    assert response.status_code < 500, response.text
    if case.path == "/dpo/loss" and response.status_code == 200:
        body = response.json()
        if body.get("trained") and body.get("new_model_version") is not None:
            assert keyed, "a train step was applied without the key"
            TRAINED_VERSIONS.add(int(body["new_model_version"]))


def _fuzz(server: ServerThread, *, keyed: bool) -> int:
    """Run every operation of the live schema through hypothesis; return operations seen."""
    api = schemathesis.openapi.from_url(f"{server.http_url}/openapi.json")
    seen = 0
    for result in api.get_all_operations():
        operation = result.ok()
        seen += 1

        @given(case=operation.as_strategy())
        @FUZZ_SETTINGS
        def run(case: Any) -> None:
            _call(case, server, keyed=keyed)

        run()
    return seen


def test_fuzz_without_key(fuzz_server: ServerThread) -> None:
    assert _fuzz(fuzz_server, keyed=False) >= 5


def test_fuzz_with_key(fuzz_server: ServerThread) -> None:
    assert _fuzz(fuzz_server, keyed=True) >= 5
