"""The example remote trainer, end to end against a real server on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import API_KEY, running_server

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_remote_trainer_learns_and_plots(tmp_path: Path, protocol: str) -> None:
    """30 train steps of 8 pairs from the shipped dataset: the plotted loss goes down (mean of
    the last 5 steps below the first 5), every step bumps the version by one, and the final
    checkpoint call reaches the server."""
    plot = tmp_path / "remote.png"
    with running_server(lr=2e-3, checkpoint_dir=str(tmp_path / "ckpt")) as srv:
        target = f"grpc://{srv.grpc_target}" if protocol == "grpc" else srv.http_url
        start_version = srv.version
        env = {**os.environ, "DPO_TRAINER_API_KEY": API_KEY}
        proc = subprocess.run(
            [
                sys.executable, str(ROOT / "examples" / "remote_dpo.py"),
                "--target", target, "--data", str(ROOT / "examples" / "data" / "preferences.jsonl"),
                "--steps", "30", "--batch-size", "8", "--plot", str(plot), "--no-progress",
            ],
            env=env, capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert srv.version == start_version + 30
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot.stat().st_size > 10_000
    history = json.loads(plot.with_suffix(".json").read_text())["train"]
    assert [h["model_version"] for h in history] == list(
        range(start_version + 1, start_version + 31)
    )
    first = sum(h["loss"] for h in history[:5]) / 5
    last = sum(h["loss"] for h in history[-5:]) / 5
    assert last < first, (first, last)
    assert "checkpoint written" in proc.stdout or "checkpoint not written" in proc.stdout
