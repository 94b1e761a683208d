"""Helpers of the hostile-input tests (``test_hostile_*.py``): raw HTTP over sockets, metric
samples, and a way to keep the engine's worker busy as a long step would."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx

from conftest import API_KEY, ServerThread

AUTH = {"Authorization": f"Bearer {API_KEY}"}
TEXT = [{"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " five"}]
IDS = [{"prompt_ids": [256, 72, 105], "chosen_ids": [33, 257], "rejected_ids": [63, 257]}]
# a loss request that takes the tiny model a while (~0.1 s): 32 pairs of ~250 tokens
HEAVY = [
    {"prompt_ids": list(range(1, 120)), "chosen_ids": list(range(2, 130)),
     "rejected_ids": list(range(3, 130))}
] * 32  # fmt: skip
ERROR_KEYS = {"code", "detail", "errors"}

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 when none)."""
    total = 0.0
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None or match.group(1) != name:
            continue
        found = dict(_LABEL.findall(match.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(3))
    return total


def metrics(server: ServerThread) -> str:
    return httpx.get(f"{server.http_url}/metrics", timeout=30).text


def requests_total(text: str, endpoint: str, protocol: str, code: str) -> float:
    return metric(text, "dpo_requests_total", endpoint=endpoint, protocol=protocol, code=code)


def is_error_shape(body: Any) -> bool:
    return (
        isinstance(body, dict)
        and set(body) >= ERROR_KEYS
        and isinstance(body["code"], str)
        and isinstance(body["detail"], str)
        and isinstance(body["errors"], list)
    )


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes
    closed: bool  # the server closed the connection after it

    def json(self) -> Any:
        return json.loads(self.body)


def read_response(sock: socket.socket, timeout: float = 10.0) -> RawResponse | None:
    """One HTTP/1.1 response read from ``sock`` (None when the server closed it silently)."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    closed = headers.get("connection", "").lower() == "close"
    if closed:
        try:
            closed = sock.recv(1) == b""
        except OSError:
            closed = True
    return RawResponse(status, headers, body, closed)


def connect(server: ServerThread) -> socket.socket:
    return socket.create_connection(("127.0.0.1", int(server.running.http_port or 0)), timeout=10)


def raw_request(server: ServerThread, data: bytes, timeout: float = 10.0) -> RawResponse | None:
    with connect(server) as sock:
        sock.sendall(data)
        return read_response(sock, timeout)


def post_bytes(path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    hdrs = {"Host": "test", "Content-Type": "application/json", "Content-Length": str(len(body))}
    hdrs.update(headers or {})
    head = f"POST {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items())
    return (head + "\r\n").encode("latin-1") + body


@contextmanager
def busy_worker(server: ServerThread) -> Iterator[None]:
    """The engine's one worker thread held busy (as by a long train step) until the block
    exits: batches wait in the queue meanwhile."""
    release = threading.Event()
    engine = server.core.engine
    held = engine._executor.submit(release.wait, 60)
    try:
        yield
    finally:
        release.set()
        held.result(timeout=60)


def queued(server: ServerThread) -> int:
    """Requests in the engine's queue or running (not those still being prepared)."""
    engine = server.core.engine
    return int(engine.pending() - engine._batcher._admitting)


def wait_until(check: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
