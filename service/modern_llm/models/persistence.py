"""The on-disk form of :class:`~modern_llm.models.transformer.ModernDecoderLM`: a directory with
``config.json`` and ``model.safetensors``, each written atomically; nothing is ever unpickled."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def write_pretrained(
    directory: str | os.PathLike[str], config: dict[str, Any], state: Mapping[str, Tensor]
) -> Path:
    """Write ``config`` as ``config.json`` and ``state`` as ``model.safetensors`` atomically."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    config_text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    _atomic_write(out / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    _atomic_write(out / CONFIG_NAME, lambda p: Path(p).write_text(config_text, "utf-8"))
    return out


def read_pretrained(
    directory: str | os.PathLike[str],
) -> tuple[dict[str, Any], dict[str, Tensor], Path]:
    """The config dict, the CPU state dict and the weights path of a saved directory; a
    missing directory or file is ``FileNotFoundError``, malformed content ``ValueError``."""
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"model directory not found: {root}")
    config_path, weights_path = root / CONFIG_NAME, root / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"missing {path.name} in {root}")
    try:
        data = json.loads(config_path.read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"malformed {config_path}: {exc}") from exc
    try:
        state = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"malformed {weights_path}: {exc}") from exc
    return data, state, weights_path


def _atomic_write(target: Path, write: Any) -> None:
    """Call ``write(tmp_path)`` then fsync and rename onto ``target``."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
