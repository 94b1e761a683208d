"""An injected disk fault (for machines where no real one can be made: see disk_faults.py).

Importable on its own by a subprocess server: ``inject(flag)`` makes the checkpoint store's
write calls raise ``OSError(ENOSPC)`` while the file ``flag`` exists.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any


def inject(flag: Path) -> None:
    import dpo_service.state.store as store

    def guarded(fn: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            if flag.exists():
                raise OSError(errno.ENOSPC, "No space left on device (injected)")
            return fn(*args, **kwargs)

        return call

    store.save_file = guarded(store.save_file)  # type: ignore[attr-defined]
    store.write_durably = guarded(store.write_durably)  # type: ignore[attr-defined]


if __name__ == "__main__":  # python fault_inject.py FLAG: serve with the fault injected
    import sys

    inject(Path(sys.argv[1]))
    from dpo_service.cli import main

    sys.exit(main(["serve"]))
