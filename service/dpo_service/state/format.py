"""The checkpoint format: file names, the manifest, the errors, and the plain values a
checkpoint holds (:class:`Snapshot`), describes (:class:`CheckpointInfo`) or failed to hold
(:class:`CheckpointCheck`).

Layout of ``DPO_CHECKPOINT_DIR``::

    LATEST                      name of the newest checkpoint written (atomically replaced;
                                informational: start-up resumes the newest that verifies)
    .lock                       held (flock) by the one server process that writes here
    idempotency.sqlite          the idempotency record: train ``request_id`` → the step it
                                applied (SQLite, WAL, synchronous=FULL; one row per step)
    ckpt-000000000012/          one checkpoint per model version (12 optimizer steps)
        model.safetensors       model weights (state_dict)
        optimizer.safetensors   optimizer state tensors, keys ``state.<param>.<name>``
        optimizer.json          param groups + non-tensor optimizer state
        state.json              version, model identity, tokenizer identity, dtype, extras
        manifest.json           sha256 + size of every file above, self-checksummed
    ckpt-000000000009.damaged-<time>/   a damaged checkpoint moved aside (kept, never read)

Format 1 (``dpo-service-checkpoint/1``, still read) also held ``idempotency.json`` in every
checkpoint (the whole record, rewritten at each checkpoint); format 2 keeps the record in
``idempotency.sqlite`` and appends to it (:mod:`dpo_service.state.record`).

A checkpoint is committed when its directory is renamed to ``ckpt-<version>``. Its files fall
in two parts: the *weights part* (``model.safetensors``, ``state.json``, and format 1's
``idempotency.json``) and the *optimizer part* (``optimizer.*``); a checkpoint whose weights
part verifies but whose optimizer part does not can be resumed with a fresh optimizer when
``DPO_ALLOW_FRESH_OPTIMIZER`` allows it. Nothing is ever pickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

FORMAT_V1 = "dpo-service-checkpoint/1"
FORMAT = "dpo-service-checkpoint/2"
WEIGHTS_FILE = "model.safetensors"
OPTIM_TENSORS_FILE = "optimizer.safetensors"
OPTIM_META_FILE = "optimizer.json"
STATE_FILE = "state.json"
IDEMPOTENCY_FILE = "idempotency.json"  # format 1 only
MANIFEST_FILE = "manifest.json"
LATEST_FILE = "LATEST"
LOCK_FILE = ".lock"
RECORD_FILE = "idempotency.sqlite"
REQUIRED_FILES = (WEIGHTS_FILE, OPTIM_TENSORS_FILE, OPTIM_META_FILE, STATE_FILE)
REQUIRED_BY_FORMAT = {FORMAT: REQUIRED_FILES, FORMAT_V1: (*REQUIRED_FILES, IDEMPOTENCY_FILE)}
OPTIMIZER_PART = frozenset({OPTIM_TENSORS_FILE, OPTIM_META_FILE})
NAME_PATTERN = re.compile(r"^ckpt-(\d{12})$")
TMP_PREFIX = ".tmp-ckpt-"
ASIDE_PREFIX = ".old-ckpt-"  # our own damaged copy, moved aside while it is replaced
DAMAGED_SUFFIX = ".damaged-"
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
    """Everything a checkpoint holds, as plain values and CPU-serialisable tensors.

    ``optimizer`` is None when a checkpoint was read for its weights only (its optimizer part
    did not verify). ``idempotency`` is read from format-1 checkpoints only; format 2 keeps
    the record outside the checkpoint (:mod:`dpo_service.state.record`).
    """

    version: int
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None  # torch Optimizer.state_dict()
    model_config: dict[str, Any]
    tokenizer: dict[str, Any]
    idempotency: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT


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


@dataclass(frozen=True)
class CheckpointCheck:
    """What verifying one checkpoint directory found: every problem, by file name
    (``manifest.json`` for the manifest itself, ``*`` for the directory)."""

    version: int
    path: Path
    problems: dict[str, str]
    info: CheckpointInfo | None = None  # set when the manifest itself is sound
    format: str = FORMAT

    @property
    def valid(self) -> bool:
        return self.info is not None and not self.problems

    @property
    def weights_valid(self) -> bool:
        """The manifest and every file of the weights part verify (only optimizer files,
        if any, are damaged)."""
        return self.info is not None and set(self.problems) <= OPTIMIZER_PART

    @property
    def reason(self) -> str:
        return "; ".join(f"{msg}" for msg in self.problems.values()) or "valid"


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


def tokenizer_diff(saved: Mapping[str, Any], live: Mapping[str, Any]) -> list[str]:
    """The tokenizer identity's differences. With a vocabulary hash on both sides (Hugging
    Face tokenizers) the hash and size decide, so a renamed model folder still resumes;
    otherwise the tokenizer's name and size."""
    hashed = "vocab_sha256" in saved and "vocab_sha256" in live
    keys = ("vocab_sha256", "vocab_size") if hashed else ("name", "vocab_size")
    return [
        f"tokenizer {key}: checkpoint {saved.get(key)!r} != loaded {live.get(key)!r}"
        for key in keys
        if saved.get(key) != live.get(key)
    ]


def check_compatible(
    path: Path,
    snap: Snapshot,
    model_config: Mapping[str, Any],
    tokenizer: Mapping[str, Any],
) -> None:
    """Raise :class:`CheckpointMismatch` when ``snap`` was written for another model
    architecture or tokenizer than the loaded one.

    A checkpoint that recorded no model identity (Hugging Face checkpoints written before it
    was recorded) is checked by its tensors' names and shapes only, when it is restored.
    """
    if snap.model_config:
        problems = config_diff(snap.model_config, model_config)
    else:
        problems = []
        log.warning(
            "checkpoint %s records no model identity (an older writer); only its tensor "
            "names and shapes are checked against the loaded model",
            path,
        )
    problems += tokenizer_diff(snap.tokenizer, tokenizer)
    if problems:
        raise mismatch(path, problems)


def mismatch(path: Path, problems: list[str]) -> CheckpointMismatch:
    return CheckpointMismatch(
        f"checkpoint {path} was written for a different model; refusing to resume "
        f"({'; '.join(problems)}). Load the matching model or use another "
        "DPO_CHECKPOINT_DIR."
    )
