"""Low-level checkpoint I/O: fsync'd writes, file checksums, tensor digests, and the split of
an optimizer ``state_dict`` into safetensors tensors + JSON (never pickle)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch


def checkpoint_name(version: int) -> str:
    return f"ckpt-{version:012d}"


def weights_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and raw bytes (sorted by name): equal iff bit-equal."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_config_of(model: torch.nn.Module) -> dict[str, Any]:
    """The model's config as a JSON-able dict (``{}`` when it has none)."""
    to_dict = getattr(getattr(model, "config", None), "to_dict", None)
    if not callable(to_dict):
        return {}
    return json.loads(json.dumps(to_dict(), default=str))  # type: ignore[no-any-return]


def tokenizer_identity(tokenizer: Any) -> dict[str, Any]:
    """Name, size and pad id, plus ``vocab_sha256`` when the tokenizer has one (a hash of
    its whole vocabulary and special tokens: Hugging Face tokenizers)."""
    identity = {
        "name": str(getattr(tokenizer, "name", "?")),
        "vocab_size": int(getattr(tokenizer, "vocab_size", -1)),
        "pad_id": int(getattr(tokenizer, "pad_id", -1)),
    }
    vocab_hash = getattr(tokenizer, "vocab_sha256", None)
    if isinstance(vocab_hash, str):
        identity["vocab_sha256"] = vocab_hash
    return identity


def split_optimizer_state(sd: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer ``state_dict`` → (tensors for safetensors, JSON for the rest)."""
    tensors: dict[str, torch.Tensor] = {}
    tensor_names: dict[str, list[str]] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entries in sd["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{pid}.{name}"] = value.detach().cpu().contiguous()
                tensor_names.setdefault(str(pid), []).append(name)
            else:
                json.dumps(value)  # raises TypeError for anything JSON cannot hold
                scalars.setdefault(str(pid), {})[name] = value
    meta = {"param_groups": sd["param_groups"], "tensors": tensor_names, "scalars": scalars}
    return tensors, meta


def join_optimizer_state(
    tensors: Mapping[str, torch.Tensor],
    meta: Mapping[str, Any],
    template: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Inverse of :func:`split_optimizer_state`. ``template`` (the live optimizer's param
    groups) turns JSON lists back into tuples where the optimizer uses tuples (``betas``)."""
    state: dict[int, dict[str, Any]] = {}
    for pid, names in meta["tensors"].items():
        for name in names:
            state.setdefault(int(pid), {})[name] = tensors[f"state.{pid}.{name}"]
    for pid, values in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(values)
    groups = [dict(g) for g in meta["param_groups"]]
    for i, group in enumerate(groups):
        tmpl = template[i] if template is not None and i < len(template) else {}
        for key, value in group.items():
            if isinstance(tmpl.get(key), tuple) and isinstance(value, list):
                group[key] = tuple(value)
    return {"state": state, "param_groups": groups}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it (the caller fsyncs the directory)."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def write_json(path: Path, value: Any) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(value, fh, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())


def unshared_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, and no two entries sharing storage (safetensors refuses shared ones)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()
        seen.add(ptr)
        out[name] = t
    return out
