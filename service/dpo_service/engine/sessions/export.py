"""A session's adapter in PEFT's own format (issue 12): a directory with
``adapter_config.json`` (written by PEFT's ``LoraConfig.save_pretrained``) and
``adapter_model.safetensors`` (keys as ``PeftModel.save_pretrained`` writes them), so
``peft.PeftModel.from_pretrained(base, path)`` on the same base reproduces the service's
log-probs. Over HTTP it travels as an uncompressed tar of those two files."""

from __future__ import annotations

import io
import tarfile
import tempfile
from pathlib import Path

from safetensors.torch import save_file

from dpo_service.engine.sessions.lora import PeftExport

FILES = ("adapter_config.json", "adapter_model.safetensors")


def write_adapter_dir(export: PeftExport, out: Path) -> Path:
    """Write ``export`` into directory ``out`` (created); returns it."""
    out.mkdir(parents=True, exist_ok=True)
    export.config.save_pretrained(str(out))
    save_file(export.tensors, str(out / FILES[1]), metadata={"format": "pt"})
    return out


def adapter_tar(export: PeftExport) -> bytes:
    """The two files of ``export`` as an uncompressed tar (members at the top level)."""
    buffer = io.BytesIO()
    with tempfile.TemporaryDirectory(prefix="dpo-adapter-") as tmp:
        folder = write_adapter_dir(export, Path(tmp))
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for name in FILES:
                tar.add(folder / name, arcname=name)
    return buffer.getvalue()
