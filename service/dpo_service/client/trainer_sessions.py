"""The remote trainer's sessions (issue 12): ``--session new|ID`` trains a LoRA adapter of its
own on the service's shared base instead of the default model, and ``--export DIR`` downloads
the trained adapter in PEFT's format at the end.

- ``--session new`` creates a session with the ``--lora-*`` and ``--session-lr`` options (the
  admin key: ``DPO_TRAINER_API_KEY`` or ``--api-key-file``) and writes its key, shown only
  once, to ``--session-key-file`` (default ``out/<id>.key``, mode 0600);
- ``--session ID`` continues an existing session with the key in ``--session-key-file``.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from dpo_service.client.adapter_export import download_adapter
from dpo_service.client.sessions import SessionAdmin


def add_session_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sessions (LoRA on the shared base; README 'Sessions')")
    group.add_argument("--session", help="'new' (create one) or a session id to continue")
    group.add_argument("--session-key-file", type=Path, help="where the session key is / goes")
    group.add_argument("--lora-rank", type=int, default=8)
    group.add_argument("--lora-alpha", type=float, default=16.0)
    group.add_argument("--lora-dropout", type=float, default=0.0)
    group.add_argument("--lora-seed", type=int, default=0)
    group.add_argument("--lora-targets", help="comma-separated module names (default: "
                       "attention and MLP projections)")  # fmt: skip
    group.add_argument("--session-lr", type=float, default=1e-4, help="the adapter's AdamW lr")
    group.add_argument("--export", type=Path, help="download the trained adapter (PEFT) here")
    group.add_argument("--export-url", help="HTTP base URL for --export with a grpc:// target")


@dataclass
class TrainerSession:
    """The session a run trains: its id and key."""

    id: str
    key: str
    created: bool


def open_session(args: argparse.Namespace, admin_key: str | None) -> TrainerSession | None:
    """The run's session (created for ``--session new``), or None without ``--session``."""
    if not args.session:
        return None
    if args.session != "new":
        if args.session_key_file is None:
            raise ValueError("--session ID needs --session-key-file (the key shown at creation)")
        key = args.session_key_file.read_text(encoding="utf-8").strip()
        return TrainerSession(args.session, key, created=False)
    lora: dict[str, object] = {
        "rank": args.lora_rank, "alpha": args.lora_alpha, "dropout": args.lora_dropout,
        "seed": args.lora_seed,
    }  # fmt: skip
    if args.lora_targets:
        lora["target_modules"] = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    with SessionAdmin(args.target, args.timeout) as admin:
        sid, key = admin.create(admin_key, lora=lora, optimizer={"lr": args.session_lr})
    path = args.session_key_file or Path("out") / f"{sid}.key"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(key + "\n")
    print(f"session {sid} created; its key is in {path}")
    return TrainerSession(sid, key, created=True)


def finish_session(args: argparse.Namespace, session: TrainerSession) -> None:
    """After training: the session's checkpoint (unless ``--no-checkpoint``) and ``--export``."""
    with SessionAdmin(args.target, args.timeout) as admin:
        if not args.no_checkpoint:
            try:
                info = admin.checkpoint(session.id, session.key)
                print(f"session checkpoint at version {info['model_version']}: {info['path']}")
            except Exception as err:  # checkpoints off on the server: say so, go on
                print(f"session checkpoint not written: {err}")
    if args.export is not None:
        url = args.export_url or args.target
        if not url.startswith(("http://", "https://")):
            raise ValueError("--export with a grpc:// target needs --export-url http://…")
        out = download_adapter(url, session.id, session.key, args.export, timeout=args.timeout)
        print(f"adapter exported to {out} (peft.PeftModel.from_pretrained(base, {str(out)!r}))")
