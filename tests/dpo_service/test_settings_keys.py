"""API-key validation in Settings: weak or unreadable keys stop start-up with a usable message."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest
from pydantic import ValidationError

from dpo_service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
GOOD_KEY = secrets.token_urlsafe(32)


@pytest.fixture(autouse=True)
def _no_key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DPO_API_KEY", "DPO_API_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)


def _message(exc: pytest.ExceptionInfo[ValidationError]) -> str:
    """The validator's own message (without the input pydantic appends to ``str(exc)``)."""
    return "\n".join(str(error["msg"]) for error in exc.value.errors())


def test_a_good_key_and_no_key_are_accepted() -> None:
    assert Settings(api_key=GOOD_KEY).api_key_value() == GOOD_KEY
    assert Settings().api_key_value() is None
    assert Settings(api_key="").api_key_value() is None  # empty: no key, as before


def test_a_short_key_is_refused_with_how_to_make_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DPO_API_KEY", "k3y-0f-31-characters-0123456789")
    with pytest.raises(ValidationError) as caught:
        Settings()
    message = _message(caught)
    assert "DPO_API_KEY is too short (31 characters, at least 32" in message
    assert "secrets.token_urlsafe(32)" in message
    assert "k3y-0f-31" not in message


@pytest.mark.parametrize(
    "key", ["changeme", "Change-Me", "password", "SECRET", "CHANGE-ME-TO-A-LONG-RANDOM-STRING"]
)
def test_placeholder_keys_are_refused(key: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(api_key=key)
    message = _message(caught)
    assert "DPO_API_KEY holds a placeholder" in message
    assert "secrets.token_urlsafe(32)" in message


def test_the_example_file_copied_as_the_key_is_refused(tmp_path: Path) -> None:
    example = ROOT / "secrets" / "dpo_api_key.example"
    assert len(example.read_text(encoding="utf-8").strip()) >= 32  # not caught by length alone
    copied = tmp_path / "dpo_api_key"  # `cp secrets/dpo_api_key.example secrets/dpo_api_key`
    copied.write_bytes(example.read_bytes())
    for candidate in (example, copied):
        with pytest.raises(ValidationError) as caught:
            Settings(api_key_file=candidate)
        assert f"DPO_API_KEY_FILE {candidate} holds a placeholder" in _message(caught)


def test_a_short_key_file_is_refused(tmp_path: Path) -> None:
    key_file = tmp_path / "dpo_api_key"
    key_file.write_text("s3cret\n", encoding="utf-8")
    with pytest.raises(ValidationError) as caught:
        Settings(api_key_file=key_file)
    assert f"DPO_API_KEY_FILE {key_file} is too short (6 characters" in _message(caught)


def test_a_good_key_file_loads(tmp_path: Path) -> None:
    key_file = tmp_path / "dpo_api_key"
    key_file.write_text(GOOD_KEY + "\n", encoding="utf-8")
    key_file.chmod(0o600)  # readable by its owner, this process
    assert Settings(api_key_file=key_file).api_key_value() == GOOD_KEY


def _assert_says_how_to_fix(message: str, key_file: Path) -> None:
    assert f"DPO_API_KEY_FILE {key_file} cannot be read by this process (uid {os.geteuid()}" in (
        message
    )
    assert "chmod 0644 secrets/dpo_api_key" in message
    assert "chown 10001" in message


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX permissions")
def test_an_unreadable_key_file_says_how_to_fix_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key_file = tmp_path / "dpo_api_key"
    key_file.write_text(GOOD_KEY, encoding="utf-8")
    key_file.chmod(0o000)
    if os.geteuid() == 0:
        # root reads any file: simulate the container user's EACCES instead
        def denied(self: Path, *args: object, **kwargs: object) -> str:
            raise PermissionError(13, "Permission denied", str(self))

        monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(ValidationError) as caught:
        Settings(api_key_file=key_file)
    message = _message(caught)
    _assert_says_how_to_fix(message, key_file)
    assert "mode 0000" in message


def test_a_missing_or_directory_key_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(api_key_file=tmp_path / "absent")
    assert "does not exist" in _message(caught)
    with pytest.raises(ValidationError) as caught:
        Settings(api_key_file=tmp_path)
    assert f"DPO_API_KEY_FILE {tmp_path} cannot be read" in _message(caught)
