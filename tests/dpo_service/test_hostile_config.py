"""A refused API key is never repeated in the error the CLI prints (pydantic would echo the
input value: Settings sets ``hide_input_in_errors``), and the new connection limits are
settings like any other."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from dpo_service.cli import main
from dpo_service.settings import Settings

# refused (too short), but distinctive enough to find in any output
SHORT_KEY = "Sh0rtKey-7c1e-visible"
PLACEHOLDER = "changeme"


@pytest.fixture(autouse=True)
def _no_key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DPO_API_KEY", "DPO_API_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("key", [SHORT_KEY, PLACEHOLDER])
def test_a_refused_key_is_not_in_the_error(key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(api_key=key)
    assert key not in str(caught.value)
    monkeypatch.setenv("DPO_API_KEY", key)
    with pytest.raises(ValidationError) as from_env:
        Settings()
    assert key not in str(from_env.value) and "DPO_API_KEY" in str(from_env.value)


def test_the_cli_does_not_print_a_refused_key(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DPO_API_KEY", SHORT_KEY)
    assert main(["info"]) == 2
    out = capsys.readouterr()
    assert "invalid configuration" in out.err and "too short" in out.err
    assert SHORT_KEY not in out.err + out.out


def test_connection_limits_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "DPO_MAX_HEADER_BYTES": "4096",
        "DPO_HEADER_TIMEOUT_S": "2.5",
        "DPO_BODY_TIMEOUT_S": "7",
        "DPO_MAX_CONNECTIONS": "9",
    }.items():
        monkeypatch.setenv(name, value)
    s = Settings()
    assert (s.max_header_bytes, s.header_timeout_s, s.body_timeout_s, s.max_connections) == (
        4096,
        2.5,
        7.0,
        9,
    )
    with pytest.raises(ValidationError):
        Settings(max_connections=0)
