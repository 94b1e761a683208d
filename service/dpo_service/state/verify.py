"""Verifying and reading one checkpoint directory (safetensors + JSON only, never pickle).

:func:`inspect` checks the manifest and every file's size and sha256 and reports *every*
problem by file, so a caller can tell a checkpoint whose weights verify but whose optimizer
state does not (:attr:`CheckpointCheck.weights_valid`) from one that is unusable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file

from dpo_service.state.files import join_optimizer_state, sha256_file
from dpo_service.state.format import (
    FORMAT_V1,
    IDEMPOTENCY_FILE,
    MANIFEST_FILE,
    NAME_PATTERN,
    OPTIM_META_FILE,
    OPTIM_TENSORS_FILE,
    REQUIRED_BY_FORMAT,
    STATE_FILE,
    WEIGHTS_FILE,
    CheckpointCheck,
    CheckpointCorrupt,
    CheckpointInfo,
    Snapshot,
    json_file,
    manifest_digest,
)


def _manifest(path: Path, version: int) -> tuple[dict[str, Any] | None, str | None]:
    """The manifest when it is sound, else (None, the reason)."""
    try:
        manifest = json_file(path / MANIFEST_FILE)
    except CheckpointCorrupt as exc:
        return None, str(exc)
    if not isinstance(manifest, dict) or manifest.get("format") not in REQUIRED_BY_FORMAT:
        return None, f"{MANIFEST_FILE}: not a dpo-service checkpoint manifest"
    if manifest.get("manifest_sha256") != manifest_digest(manifest):
        return None, f"{MANIFEST_FILE}: checksum mismatch (edited or corrupted)"
    if manifest.get("version") != version:
        return None, f"{MANIFEST_FILE}: version {manifest.get('version')} != directory name"
    if not isinstance(manifest.get("files"), dict):
        return None, f"{MANIFEST_FILE}: no file list"
    return manifest, None


def _file_problem(path: Path, name: str, entry: Any) -> str | None:
    if not isinstance(entry, dict):
        return f"{MANIFEST_FILE} does not list {name}"
    fpath = path / name
    if not fpath.is_file():
        return f"{name}: missing"
    try:
        size = fpath.stat().st_size
        if size != entry.get("bytes"):
            return f"{name}: {size} bytes, manifest says {entry.get('bytes')} (truncated?)"
        if sha256_file(fpath) != entry.get("sha256"):
            return f"{name}: sha256 mismatch (corrupted)"
    except OSError as exc:
        return f"{name}: unreadable ({exc})"
    return None


def inspect(path: Path) -> CheckpointCheck:
    """Verify ``path`` (``ckpt-<version>``) and report every problem by file name."""
    m = NAME_PATTERN.match(path.name)
    version = int(m.group(1)) if m else -1
    if m is None or not path.is_dir():
        return CheckpointCheck(version, path, {"*": f"{path} is not a checkpoint directory"})
    manifest, problem = _manifest(path, version)
    if manifest is None:
        return CheckpointCheck(version, path, {MANIFEST_FILE: str(problem)})
    files, fmt = manifest["files"], str(manifest["format"])
    problems = {}
    for name in REQUIRED_BY_FORMAT[fmt]:
        found = _file_problem(path, name, files.get(name))
        if found is not None:
            problems[name] = found
    info = CheckpointInfo(
        version,
        path,
        {k: v.get("sha256", "") for k, v in files.items() if isinstance(v, dict)},
        str(manifest.get("weights_sha256", "")),
        float(manifest.get("created_unix", 0.0)),
    )
    return CheckpointCheck(version, path, problems, info, fmt)


def verify(path: Path) -> CheckpointInfo:
    """:func:`inspect`, raising :class:`CheckpointCorrupt` (naming every problem)."""
    check = inspect(path)
    if not check.valid:
        raise CheckpointCorrupt(check.reason)
    assert check.info is not None
    return check.info


def _tensors(path: Path) -> dict[str, Any]:
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointCorrupt(f"{path.name}: unreadable safetensors ({exc})") from exc


def read_weights_part(check: CheckpointCheck) -> Snapshot:
    """The weights, identities, extras (and format 1's idempotency record) of a checkpoint
    whose weights part verified; ``optimizer`` is None."""
    path = check.path
    weights = _tensors(path / WEIGHTS_FILE)
    state = json_file(path / STATE_FILE)
    record = json_file(path / IDEMPOTENCY_FILE) if check.format == FORMAT_V1 else []
    try:
        snap = Snapshot(
            version=int(state["version"]),
            weights=weights,
            optimizer=None,
            model_config=dict(state["model_config"]),
            tokenizer=dict(state["tokenizer"]),
            idempotency=[(str(rid), dict(body)) for rid, body in record],
            extra=dict(state.get("extra") or {}),
            format=check.format,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointCorrupt(f"{STATE_FILE}: malformed ({exc})") from exc
    if snap.version != check.version:
        raise CheckpointCorrupt(f"{STATE_FILE}: version {snap.version} != {check.version}")
    return snap


def read_optimizer_part(path: Path, template: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The optimizer ``state_dict`` of a checkpoint whose optimizer part verified."""
    tensors = _tensors(path / OPTIM_TENSORS_FILE)
    meta = json_file(path / OPTIM_META_FILE)
    try:
        return join_optimizer_state(tensors, meta, template)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointCorrupt(f"{OPTIM_META_FILE}: malformed ({exc})") from exc
