"""Sessions survive restarts (issue 12): a real server subprocess, killed with SIGKILL after
checkpointed session steps, resumes every session (adapter, optimizer, version, key,
idempotency memory); a graceful stop also keeps the accumulated gradient."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from conftest import API_KEY
from server_process import ServerProcess

ADMIN = {"Authorization": f"Bearer {API_KEY}"}
PAIRS = [
    {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
    {"prompt": "Two plus two", "chosen": " is four.", "rejected": " is five."},
]


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.slow
def test_sessions_resume_after_kill_and_after_sigterm(tmp_path: Path) -> None:
    env = {"checkpoint_dir": tmp_path / "ckpt", "checkpoint_every": 1}
    server = ServerProcess(tmp_path / "1.log", **env)
    try:
        server.wait_ready()
        with server.client() as http:
            r = http.post("/v1/sessions", headers=ADMIN, json={"optimizer": {"lr": 1e-2}})
            a, key_a = r.json()["session"]["id"], r.json()["key"]
            r = http.post("/v1/sessions", headers=ADMIN, json={"lora": {"seed": 9}})
            b, key_b = r.json()["session"]["id"], r.json()["key"]
            trained = []
            for i in range(2):
                r = http.post("/dpo/loss", headers=_auth(key_a), json={
                    "pairs": PAIRS, "session": a, "train": True, "request_id": f"r{i}"})  # fmt: skip
                assert r.status_code == 200, r.text
                trained.append(r.json())
            before = http.post("/dpo/loss", headers=_auth(key_a),
                               json={"pairs": PAIRS, "session": a}).json()  # fmt: skip
        server.signal(signal.SIGKILL)
        server.wait()
    finally:
        server.close()
    server = ServerProcess(tmp_path / "2.log", **env)
    try:
        server.wait_ready()
        with server.client() as http:
            info = http.get(f"/v1/sessions/{a}", headers=_auth(key_a)).json()
            assert info["model_version"] == 2
            after = http.post("/dpo/loss", headers=_auth(key_a),
                              json={"pairs": PAIRS, "session": a}).json()  # fmt: skip
            assert after["chosen_logps"] == before["chosen_logps"]  # the adapter, bit for bit
            retry = http.post("/dpo/loss", headers=_auth(key_a), json={
                "pairs": PAIRS, "session": a, "train": True, "request_id": "r1"}).json()  # fmt: skip
            assert retry["new_model_version"] == 2 and retry["loss"] == trained[1]["loss"]
            assert http.get(f"/v1/sessions/{b}", headers=_auth(key_b)).status_code == 200
            assert http.get(f"/v1/sessions/{b}", headers=_auth(key_a)).status_code == 401
            r = http.post("/dpo/loss", headers=_auth(key_a), json={
                "pairs": PAIRS, "session": a, "train": True, "request_id": "r2"})  # fmt: skip
            assert r.json()["new_model_version"] == 3  # the optimizer state came back too
            r = http.post("/dpo/loss", headers=_auth(key_b), json={
                "pairs": PAIRS[:1], "session": b, "train": True, "accumulate": True})  # fmt: skip
            assert r.json()["accumulated_pairs"] == 1
        server.signal(signal.SIGTERM)
        assert server.wait() == 0
    finally:
        server.close()
    server = ServerProcess(tmp_path / "3.log", **env)
    try:
        server.wait_ready()
        with server.client() as http:
            got = http.get("/v1/sessions", headers=ADMIN).json()["sessions"]
            by_id = {s["id"]: s for s in got}
            assert by_id[a]["model_version"] == 3
            assert by_id[b]["accumulated_pairs"] == 1  # the final checkpoint kept it
            step = http.post(f"/v1/sessions/{b}/step", headers=_auth(key_b), json={})
            assert step.status_code == 200 and step.json()["new_model_version"] == 1
    finally:
        server.close()
