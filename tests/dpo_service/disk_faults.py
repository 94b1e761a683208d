"""Real disk faults for the durability tests, where this machine allows them.

The mode is chosen once per session (:func:`fault_mode`):

- ``tmpfs`` (root, and ``mount`` works): the checkpoint directory is a tiny tmpfs of its own.
  A full disk is a real ``ENOSPC`` (a filler file takes every free byte); a read-only
  directory is a real read-only remount (the kernel allows that only while no file in it is
  open for writing, i.e. before the server starts: the start-up check).
- ``chmod`` (not root): ``chmod 0o555`` makes the directory really read-only for this user:
  new files, hence checkpoints, fail with ``EACCES``. It stands in for the full disk too.
- ``inject`` (root where ``mount`` is not permitted, e.g. a container without
  CAP_SYS_ADMIN): root ignores permissions and no filesystem can be made, so the fault is an
  ``OSError`` raised at the store's write calls (``safetensors.save_file`` and
  ``write_durably``), switched on by a flag file so that a subprocess server has it too.
"""

from __future__ import annotations

import errno
import functools
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

from fault_inject import inject
from server_process import ServerProcess

# What the server's error message says for each mode's fault.
EXPECTED = {
    "tmpfs": "No space left on device",
    "chmod": "Permission denied",
    "inject": "injected",
}


@functools.cache
def fault_mode() -> str:
    """``tmpfs``, ``chmod`` or ``inject`` (see the module docstring); the environment
    variable ``DISK_FAULT_MODE`` forces one (to exercise a fallback)."""
    forced = os.environ.get("DISK_FAULT_MODE")
    if forced:
        assert forced in EXPECTED, forced
        return forced
    if os.geteuid() != 0:
        return "chmod"
    probe = Path(tempfile.mkdtemp(prefix="dpo-mount-probe-"))
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)],
            capture_output=True,
            timeout=10,
            check=False,
        )
        if done.returncode == 0:
            subprocess.run(["umount", str(probe)], capture_output=True, timeout=10, check=True)
            return "tmpfs"
    except (OSError, subprocess.SubprocessError):
        pass
    finally:
        probe.rmdir()
    return "inject"


class DiskFault:
    """A checkpoint directory (``.dir``) that a test can fill up or make read-only."""

    def __init__(self, base: Path, monkeypatch: pytest.MonkeyPatch | None = None) -> None:
        self.mode = fault_mode()
        self.dir = base / "ckpt"
        self.dir.mkdir()
        self.flag = base / "fault.flag"
        self.expected = EXPECTED[self.mode]
        self._filler = self.dir / "filler.bin"
        if self.mode == "tmpfs":
            self._mount("-t", "tmpfs", "-o", "size=16m,mode=0755", "tmpfs")
        elif self.mode == "inject" and monkeypatch is not None:
            import dpo_service.state.store as store

            monkeypatch.setattr(store, "save_file", store.save_file)  # restored afterwards
            monkeypatch.setattr(store, "write_durably", store.write_durably)
            inject(self.flag)

    def _mount(self, *args: str) -> None:
        subprocess.run(["mount", *args, str(self.dir)], capture_output=True, timeout=10, check=True)

    def fill(self) -> None:
        """A full disk (``chmod``: a read-only directory; ``inject``: OSError)."""
        if self.mode == "tmpfs":
            with open(self._filler, "wb", buffering=0) as fh:
                for size in (1 << 20, 1 << 12):
                    try:
                        while True:
                            fh.write(b"\0" * size)
                    except OSError as exc:
                        assert exc.errno == errno.ENOSPC, exc
        elif self.mode == "chmod":
            self.dir.chmod(0o555)
        else:
            self.flag.touch()

    def free(self) -> None:
        if self.mode == "tmpfs":
            self._filler.unlink(missing_ok=True)
        elif self.mode == "chmod":
            self.dir.chmod(0o755)
        else:
            self.flag.unlink(missing_ok=True)

    def read_only(self) -> None:
        """A read-only directory (``tmpfs``: a remount; nothing may be open for writing)."""
        if self.mode == "tmpfs":
            self._mount("-o", "remount,ro")
        elif self.mode == "chmod":
            self.dir.chmod(0o555)
        else:
            self.flag.touch()

    @property
    def read_only_expected(self) -> str:
        return {"tmpfs": "Read-only file system", "chmod": "Permission denied"}.get(
            self.mode, "injected"
        )

    def writable(self) -> None:
        if self.mode == "tmpfs":
            self._mount("-o", "remount,rw")
        else:
            self.free()

    def close(self) -> None:
        if self.mode == "tmpfs":
            subprocess.run(["umount", "-l", str(self.dir)], capture_output=True, timeout=10)
        else:
            self.free()

    def server_process(self, log_path: Path, **env: Any) -> ServerProcess:
        """A real ``dpo-service serve`` subprocess on this directory (with the injected
        fault in ``inject`` mode)."""
        if self.mode != "inject":
            return ServerProcess(log_path, checkpoint_dir=self.dir, **env)
        server = ServerProcess.__new__(ServerProcess)
        server.command = (str(Path(__file__).resolve().parent / "fault_inject.py"), str(self.flag))
        ServerProcess.__init__(server, log_path, checkpoint_dir=self.dir, **env)
        return server
