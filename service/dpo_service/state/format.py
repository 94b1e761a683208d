"""The checkpoint format: file names, the manifest, the errors, and the plain values a
checkpoint holds (:class:`Snapshot`) or describes (:class:`CheckpointInfo`).

Layout of ``DPO_CHECKPOINT_DIR``::

    LATEST                      name of the newest committed checkpoint (atomically replaced)
    .lock                       held (flock) by the one server process that writes here
    ckpt-000000000012/          one checkpoint per model version (12 optimizer steps)
        model.safetensors       model weights (state_dict)
        optimizer.safetensors   optimizer state tensors, keys ``state.<param>.<name>``
        optimizer.json          param groups + non-tensor optimizer state
        state.json              version, model config, tokenizer identity, dtype, extras
        idempotency.json        recent train ``request_id`` → versioned result JSON, oldest first
        manifest.json           sha256 + size of every file above, self-checksummed

Nothing is ever pickled.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

FORMAT = "dpo-service-checkpoint/1"
WEIGHTS_FILE = "model.safetensors"
OPTIM_TENSORS_FILE = "optimizer.safetensors"
OPTIM_META_FILE = "optimizer.json"
STATE_FILE = "state.json"
IDEMPOTENCY_FILE = "idempotency.json"
MANIFEST_FILE = "manifest.json"
LATEST_FILE = "LATEST"
LOCK_FILE = ".lock"
REQUIRED_FILES = (WEIGHTS_FILE, OPTIM_TENSORS_FILE, OPTIM_META_FILE, STATE_FILE, IDEMPOTENCY_FILE)
NAME_PATTERN = re.compile(r"^ckpt-(\d{12})$")
TMP_PREFIX = ".tmp-ckpt-"
# Config keys that only shape the initialisation, not the architecture.
INIT_ONLY_KEYS = frozenset({"seed", "init_std", "transformers_version", "_name_or_path"})


class CheckpointError(ValueError):
    """A checkpoint directory cannot be used."""


class CheckpointCorrupt(CheckpointError):
    """A checkpoint failed verification (truncated, corrupted, incomplete)."""


class CheckpointMismatch(CheckpointError):
    """A checkpoint was written for a different model or tokenizer."""


@dataclass
class Snapshot:
    """Everything a checkpoint holds, as plain values and CPU-serialisable tensors."""

    version: int
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]  # torch Optimizer.state_dict()
    model_config: dict[str, Any]
    tokenizer: dict[str, Any]
    idempotency: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckpointInfo:
    """A written or verified checkpoint."""

    version: int
    path: Path
    files: dict[str, str]  # file name → sha256
    weights_sha256: str
    created_unix: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "path": str(self.path),
            "files": dict(self.files),
            "weights_sha256": self.weights_sha256,
            "created_unix": self.created_unix,
        }


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def json_file(path: Path) -> Any:
    try:
        return json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointCorrupt(f"{path.name}: unreadable ({exc})") from exc


def config_diff(saved: Mapping[str, Any], live: Mapping[str, Any]) -> list[str]:
    keys = (set(saved) | set(live)) - INIT_ONLY_KEYS
    return [
        f"{k}: checkpoint {saved.get(k)!r} != loaded {live.get(k)!r}"
        for k in sorted(keys)
        if saved.get(k) != live.get(k)
    ]


def check_compatible(
    path: Path,
    snap: Snapshot,
    model_config: Mapping[str, Any],
    tokenizer: Mapping[str, Any],
) -> None:
    """Raise :class:`CheckpointMismatch` when ``snap`` was written for another model
    architecture or tokenizer than the loaded one."""
    problems = config_diff(snap.model_config, model_config)
    for key in ("name", "vocab_size"):
        if snap.tokenizer.get(key) != tokenizer.get(key):
            problems.append(
                f"tokenizer {key}: checkpoint {snap.tokenizer.get(key)!r} != "
                f"loaded {tokenizer.get(key)!r}"
            )
    if problems:
        raise CheckpointMismatch(
            f"checkpoint {path} was written for a different model; refusing to resume "
            f"({'; '.join(problems)}). Load the matching model or use another "
            "DPO_CHECKPOINT_DIR."
        )
