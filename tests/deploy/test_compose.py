"""compose.yaml, docker/Dockerfile and .dockerignore: what a real `docker compose up` relies on."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHECKPOINT_DIR = "/data/checkpoints"


def _compose_config(profiles: tuple[str, ...] = ("gpu",), **variables: str) -> dict[str, Any]:
    if shutil.which("docker") is None:
        pytest.skip("the docker CLI is not installed (compose.yaml is checked with it)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DPO_", "COMPOSE_"))}
    env.update(variables)
    done = subprocess.run(
        [
            "docker",
            "compose",
            "-f",
            "compose.yaml",
            *(arg for profile in profiles for arg in ("--profile", profile)),
            "config",
            "--format",
            "json",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    config: dict[str, Any] = json.loads(done.stdout)
    return config


def test_each_service_has_its_own_checkpoint_volume() -> None:
    """Two servers on one checkpoint directory: the second is refused by the directory lock
    (and would otherwise resume the other's weights)."""
    config = _compose_config()
    services = config["services"]
    assert {"dpo", "dpo-gpu"} <= set(services)
    sources = {}
    for name in ("dpo", "dpo-gpu"):
        service = services[name]
        assert service["environment"]["DPO_CHECKPOINT_DIR"] == CHECKPOINT_DIR
        mounts = [m for m in service.get("volumes", []) if m["target"] == CHECKPOINT_DIR]
        assert len(mounts) == 1, service.get("volumes")
        assert mounts[0]["type"] == "volume", mounts[0]
        sources[name] = mounts[0]["source"]
        assert sources[name] in config["volumes"]
    assert sources["dpo"] != sources["dpo-gpu"], sources
    names = {config["volumes"][source]["name"] for source in sources.values()}
    assert len(names) == 2, names


def test_multi_gpu_profile_runs_torchrun_on_every_gpu() -> None:
    """`--profile multi-gpu`: the CUDA image under torchrun, one rank per GPU (DPO_NPROC,
    default 2), every GPU reserved, shared memory for NCCL, the gpu service's healthcheck,
    secret and restart policy."""
    config = _compose_config(("gpu", "multi-gpu"))
    services = config["services"]
    multi, gpu = services["dpo-multi-gpu"], services["dpo-gpu"]
    assert multi["profiles"] == ["multi-gpu"]
    assert multi["image"] == gpu["image"]
    assert multi["build"]["args"] == gpu["build"]["args"]
    launch = [*multi["entrypoint"], *multi["command"]]
    assert launch[0] == "torchrun", launch
    assert launch[launch.index("--nproc-per-node") + 1] == "2", launch
    assert launch[-3:] == ["-m", "dpo_service", "serve"], launch
    assert "--standalone" in launch
    # the shutdown torchrun allows each rank outlasts the service's own drain
    drain = float(multi["environment"]["DPO_DRAIN_TIMEOUT_S"])
    assert int(launch[launch.index("--shutdown-timeout") + 1]) > drain
    devices = multi["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1 and devices[0]["driver"] == "nvidia", devices
    assert devices[0]["count"] == -1, devices  # `count: all`
    assert "gpu" in devices[0]["capabilities"]
    assert multi.get("ipc") == "host" or int(multi["shm_size"]) >= 1 << 30, multi.get("shm_size")
    assert multi["environment"]["DPO_DEVICE"] == "cuda"
    assert multi["environment"]["DPO_PARALLEL"] == "auto"
    for key in ("healthcheck", "restart", "secrets"):
        assert multi[key] == gpu[key], key
    assert multi["environment"]["DPO_API_KEY_FILE"] == gpu["environment"]["DPO_API_KEY_FILE"]
    ports = {(p["target"], p["published"]) for p in multi["ports"]}
    taken = {p["published"] for name in ("dpo", "dpo-gpu") for p in services[name]["ports"]}
    assert {target for target, _ in ports} == {8000, 50051}
    assert not {published for _, published in ports} & taken, (ports, taken)


def test_multi_gpu_rank_count_and_mode_come_from_the_environment() -> None:
    config = _compose_config(("multi-gpu",), DPO_NPROC="8", DPO_PARALLEL="fsdp")
    multi = config["services"]["dpo-multi-gpu"]
    launch = multi["entrypoint"]
    assert launch[launch.index("--nproc-per-node") + 1] == "8", launch
    assert multi["environment"]["DPO_PARALLEL"] == "fsdp"


def test_every_profile_has_its_own_checkpoint_volume() -> None:
    config = _compose_config(("gpu", "multi-gpu"))
    services = config["services"]
    sources = {}
    for name in ("dpo", "dpo-gpu", "dpo-multi-gpu"):
        service = services[name]
        assert service["environment"]["DPO_CHECKPOINT_DIR"] == CHECKPOINT_DIR
        mounts = [m for m in service.get("volumes", []) if m["target"] == CHECKPOINT_DIR]
        assert len(mounts) == 1 and mounts[0]["type"] == "volume", service.get("volumes")
        sources[name] = mounts[0]["source"]
    names = {config["volumes"][source]["name"] for source in sources.values()}
    assert len(names) == 3, sources


def _instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per Dockerfile instruction: continuations joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        pending += " " + stripped.removesuffix("\\")
        if not stripped.endswith("\\"):
            keyword, _, args = pending.strip().partition(" ")
            out.append((keyword.upper(), args.strip()))
            pending = ""
    return out


def _copy_sources(args: str) -> list[str]:
    words = [w for w in args.split() if not w.startswith("--")]
    return words[:-1]


def test_dockerfile_installs_dependencies_before_the_source() -> None:
    text = (ROOT / "docker" / "Dockerfile").read_text(encoding="utf-8")
    # a parser directive makes BuildKit fetch a frontend image from Docker Hub
    assert not re.search(r"^#\s*syntax\s*=", text, re.M | re.I)
    steps = _instructions(text)
    copy_service = next(
        i
        for i, (keyword, args) in enumerate(steps)
        if keyword == "COPY"
        and any(s.rstrip("/") == "service" or s.startswith("service/") for s in _copy_sources(args))
    )
    deps = [
        i
        for i, (keyword, args) in enumerate(steps[:copy_service])
        if keyword == "RUN" and "DEPS_ONLY=1" in args and "bash scripts/setup.sh" in args
    ]
    assert deps, (
        "no RUN installs the dependencies (DEPS_ONLY=1 scripts/setup.sh) before COPY service"
    )
    stage = max(i for i, (keyword, _) in enumerate(steps[: deps[0]]) if keyword == "FROM")
    copied_first = [
        source
        for keyword, args in steps[stage : deps[0]]
        if keyword == "COPY"
        for source in _copy_sources(args)
    ]
    # only what the dependency step reads: a README or code change keeps that layer cached
    assert set(copied_first) <= {"pyproject.toml", "scripts/setup.sh", "scripts"}, copied_first
    after = [args for keyword, args in steps[copy_service:] if keyword == "RUN"]
    assert after and "NO_DEPS=1" in after[0] and "bash scripts/setup.sh" in after[0], after


def _ignored(path: str, patterns: list[str]) -> bool:
    """Whether the build context leaves ``path`` out (Docker's rules: ``*`` stays within one
    path element, ``**`` spans any, a pattern that matches a folder leaves out its content,
    ``!`` re-includes, the last match wins)."""
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern.removeprefix("!").strip("/")
        regex = ""
        for token in re.split(r"(\*\*/|\*\*|\*|\?)", body):
            regex += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(
                token, re.escape(token)
            )
        if re.fullmatch(regex + "(?:/.*)?", path):
            result = not negate
    return result


def test_dockerignore_keeps_build_outputs_out_of_the_context() -> None:
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    for path in (
        "dpo_loss_service.egg-info/PKG-INFO",
        "service/dpo_loss_service.egg-info/PKG-INFO",  # setuptools writes it beside the packages
        "build/lib/dpo_service/settings.py",
        "dist/dpo_loss_service-0.1.0.tar.gz",
        "secrets/dpo_api_key",
        ".venv/bin/python",
    ):
        assert _ignored(path, patterns), path
    for path in ("pyproject.toml", "README.md", "scripts/setup.sh", "service/dpo_service/cli.py"):
        assert not _ignored(path, patterns), path
