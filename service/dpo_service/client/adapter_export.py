"""Download a session's adapter (issue 12): ``GET /v1/sessions/{id}/adapter`` and unpack its
two files (``adapter_config.json``, ``adapter_model.safetensors``) into a directory that
``peft.PeftModel.from_pretrained(base, path)`` loads. Used by ``dpo-service export-adapter``
and the remote trainer's ``--export``."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import httpx

from dpo_service.client.transports import DpoClientError
from dpo_service.errors import ErrorCode

FILES = ("adapter_config.json", "adapter_model.safetensors")
#: Largest adapter accepted (bytes): a rank-1024 adapter of a 70B model is smaller.
MAX_BYTES = 8 << 30


def unpack_adapter(data: bytes, out: Path) -> Path:
    """Write the expected members of the tar ``data`` into ``out``; anything else in the
    archive (other names, links, directories) is refused, never extracted."""
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        members = tar.getmembers()
        names = sorted(m.name for m in members)
        if names != sorted(FILES) or not all(m.isfile() for m in members):
            raise ValueError(f"unexpected adapter archive members: {names}")
        for member in members:
            source = tar.extractfile(member)
            assert source is not None
            (out / member.name).write_bytes(source.read())
    return out


def download_adapter(
    base_url: str, session: str, key: str | None, out: Path, *, timeout: float = 300.0
) -> Path:
    """Fetch session ``session``'s adapter from the service at ``base_url`` into ``out``."""
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    url = f"{base_url.rstrip('/')}/v1/sessions/{session}/adapter"
    with httpx.Client(timeout=timeout) as client:
        response = client.get(url, headers=headers)
    if response.status_code != 200:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        code = {401: ErrorCode.UNAUTHENTICATED, 404: ErrorCode.NOT_FOUND}.get(
            response.status_code, ErrorCode.INTERNAL
        )
        raise DpoClientError(
            code, f"export of session {session} failed: {detail}", response.status_code
        )
    if len(response.content) > MAX_BYTES:
        raise ValueError(f"adapter archive of {len(response.content)} bytes is too large")
    return unpack_adapter(response.content, out)
