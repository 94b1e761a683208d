"""The remote trainer with ``--session new`` and ``--export`` (issue 12), over REST and gRPC:
each run trains its own session, the default model never moves, the adapter lands on disk."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from conftest import API_KEY, running_server
from dpo_service.cli import main

ROWS = [
    {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
    {"prompt": "Two plus two", "chosen": " is four.", "rejected": " is five."},
    {"prompt": "Water is", "chosen": " wet.", "rejected": " dry."},
    {"prompt": "Cats", "chosen": " purr.", "rejected": " bark."},
]


@pytest.mark.slow
def test_remote_trainer_trains_a_session_and_exports_it(tmp_path: Path) -> None:
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    admin_key = tmp_path / "admin.key"
    admin_key.write_text(API_KEY)
    with running_server() as srv:
        runs = {"http": srv.http_url, "grpc": f"grpc://{srv.grpc_target}"}
        for name, target in runs.items():
            out = tmp_path / name
            argv = [
                "train-remote", "--target", target, "--data", str(data), "--steps", "3",
                "--batch-size", "2", "--api-key-file", str(admin_key), "--no-progress",
                "--plot", str(out / "plot.png"), "--session", "new", "--lora-rank", "4",
                "--session-lr", "1e-2", "--session-key-file", str(out / "session.key"),
                "--export", str(out / "adapter"), "--export-url", srv.http_url,
            ]  # fmt: skip
            assert main(argv) == 0
            assert (out / "adapter" / "adapter_model.safetensors").is_file()
            assert (out / "session.key").stat().st_mode & 0o077 == 0  # the key file is private
            history = json.loads((out / "plot.json").read_text())
            assert [r["model_version"] for r in history["train"]] == [1, 2, 3]
        assert srv.version == 0  # the default model never moved
        with httpx.Client(base_url=srv.http_url) as http:
            listed = http.get("/v1/sessions", headers={"Authorization": f"Bearer {API_KEY}"})
        sessions = listed.json()["sessions"]
        assert len(sessions) == 2 and all(s["model_version"] == 3 for s in sessions)
        # same seeds and data on both protocols: the same training
        assert sessions[0]["last_loss"] == pytest.approx(sessions[1]["last_loss"], abs=1e-6)
