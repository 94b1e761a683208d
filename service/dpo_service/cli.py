"""``dpo-service`` command line: ``serve``, ``info``, ``train-remote``, ``precompute-reference``,
``export-adapter``.

Settings come from ``DPO_*`` environment variables; the flags here override the few that
people change on the command line. Secrets (the API key) are never accepted as flags.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from dpo_service.settings import Settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpo-service", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve REST (and gRPC) until SIGTERM")
    serve.add_argument("--model", help="builtin, a ModernDecoderLM directory, or hf:/path")
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="HTTP port (default 8000)")
    serve.add_argument("--grpc-port", type=int, help="gRPC port (default 50051)")
    serve.add_argument("--no-grpc", action="store_true", help="do not serve gRPC")
    serve.add_argument("--no-http", action="store_true", help="do not serve HTTP")
    serve.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    serve.add_argument("--checkpoint-dir", help="checkpoint directory (resumed at start)")
    serve.add_argument(
        "--nproc-per-node",
        type=int,
        help="run N ranks on this host under torchrun (same as `torchrun --standalone "
        '--nproc-per-node N -m dpo_service serve ...`; README "Past one device")',
    )
    remote = sub.add_parser("train-remote", help="train a running service from a preference file")
    from dpo_service.client.remote_trainer import add_arguments

    add_arguments(remote)
    _add_precompute(sub)
    _add_export_adapter(sub)
    info = sub.add_parser("info", help="print the effective settings (secrets masked) and exit")
    info.add_argument("--model", help="as for serve")
    return parser


def _add_precompute(sub: Any) -> None:
    pre = sub.add_parser(
        "precompute-reference",
        help="fill the reference log-prob cache for a JSONL/Parquet dataset (same DPO_* "
        "settings as the server)",
    )
    pre.add_argument("--data", required=True, help="preference dataset (JSONL or Parquet)")
    pre.add_argument("--model", help="as for serve")
    pre.add_argument("--checkpoint-dir", help="as for serve (locates the default cache file)")
    pre.add_argument("--batch-pairs", type=int, default=32, help="pairs per reference pass")


def _add_export_adapter(sub: Any) -> None:
    exp = sub.add_parser(
        "export-adapter",
        help="download a session's LoRA adapter in PEFT's format (adapter_config.json + "
        "adapter_model.safetensors); the key (session or admin) comes from "
        "DPO_TRAINER_API_KEY or --api-key-file",
    )
    exp.add_argument("--url", required=True, help="the service's HTTP base URL")
    exp.add_argument("--session", required=True, help="the session id")
    exp.add_argument("--out", required=True, help="directory to write the two files to")
    exp.add_argument("--api-key-file", help="file holding the session (or admin) key")


def _export_adapter(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dpo_service.client.adapter_export import download_adapter
    from dpo_service.client.remote_trainer import TrainerSettings
    from dpo_service.client.transports import DpoClientError

    secret = TrainerSettings().api_key
    key = secret.get_secret_value() if secret is not None else None
    if args.api_key_file is not None:
        key = Path(args.api_key_file).read_text(encoding="utf-8").strip()
    try:
        out = download_adapter(args.url, args.session, key, Path(args.out))
    except (DpoClientError, ValueError, OSError) as exc:
        print(f"dpo-service export-adapter: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"session": args.session, "path": str(out)}))
    return 0


def _precompute(args: argparse.Namespace, settings: Settings) -> int:
    from pathlib import Path

    from dpo_service.client.preference_data import DatasetError, load_examples
    from dpo_service.engine.precompute import precompute_reference

    try:
        pairs = [e.to_pair() for e in load_examples(Path(args.data))]
        report = precompute_reference(settings, pairs, batch_pairs=args.batch_pairs)
    except (DatasetError, ValueError, FileNotFoundError) as exc:
        print(f"dpo-service precompute-reference: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(vars(report)))
    return 0


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ("model", "host", "port", "grpc_port", "device", "checkpoint_dir"):
        value = getattr(args, name, None)
        if value is not None:
            out[name] = value
    if getattr(args, "no_grpc", False):
        out["enable_grpc"] = False
    if getattr(args, "no_http", False):
        out["enable_http"] = False
    return out


def torchrun_argv(argv: list[str], nproc: int) -> list[str]:
    """``serve ... --nproc-per-node N`` as the torchrun command line that runs it."""
    rest: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc-per-node":
            skip = True
        elif not arg.startswith("--nproc-per-node="):
            rest.append(arg)
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "dpo_service",
        *rest,
    ]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve" and args.nproc_per_node is not None:
        if args.nproc_per_node < 1:
            print("dpo-service: --nproc-per-node must be at least 1", file=sys.stderr)
            return 2
        import os

        command = torchrun_argv(sys.argv[1:] if argv is None else argv, args.nproc_per_node)
        os.execv(command[0], command)  # torchrun starts the ranks; never returns
    if args.command == "train-remote":
        from dpo_service.client.remote_trainer import run

        return run(args)
    if args.command == "export-adapter":  # issue 12: a client command, no server settings
        return _export_adapter(args)
    try:
        settings = Settings(**_overrides(args))
    except Exception as exc:  # pydantic ValidationError or an unreadable key file
        print(f"dpo-service: invalid configuration: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command == "info":
        print(json.dumps(settings.model_dump(mode="json"), indent=2, default=str))
        return 0
    if args.command == "precompute-reference":
        return _precompute(args, settings)
    import torch

    from dpo_service.server import run as serve_until_stopped

    # before any torch worker thread starts, so the whole thread pool inherits the flag
    torch.set_flush_denormal(settings.flush_denormal)

    try:
        return serve_until_stopped(settings)  # 3: final checkpoint failed; 4: a rank failed
    except (FileNotFoundError, ValueError) as exc:
        logging.getLogger("dpo_service").error("start-up failed: %s", exc)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
