"""The README and the deployment files say what the code does."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import config_table  # noqa: E402


def test_config_table_matches_settings() -> None:
    """Every DPO_* setting is in the README with its current default and description."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert config_table.readme_with_table(text) == text, (
        "run: python scripts/config_table.py --write"
    )


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "bash scripts/test.sh" in readme
    assert re.search(r"^bash scripts/test\.sh\s*$", ci, re.M), ci


def test_dockerfile_installs_with_the_readme_script() -> None:
    """The image runs the very install script the README's two commands run."""
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text(encoding="utf-8")
    serve = (ROOT / "scripts" / "serve.sh").read_text(encoding="utf-8")
    test = (ROOT / "scripts" / "test.sh").read_text(encoding="utf-8")
    assert re.search(r"^\s*bash scripts/setup\.sh", dockerfile, re.M)
    assert "bash scripts/setup.sh" in serve and "bash scripts/setup.sh" in test
    # the torch pin the image uses is the script's default
    setup = (ROOT / "scripts" / "setup.sh").read_text(encoding="utf-8")
    pin = re.search(r"TORCH_SPEC=\$\{TORCH_SPEC:-([^}]+)\}", setup)
    assert pin is not None
    assert f"ARG TORCH_SPEC={pin.group(1)}" in dockerfile
