"""Remote DPO training against a running service (same as ``dpo-service train-remote``).

    DPO_TRAINER_API_KEY=... python examples/remote_dpo.py \\
        --target grpc://127.0.0.1:50051 --data examples/data/preferences.jsonl --steps 40
"""

from dpo_service.client.remote_trainer import main

if __name__ == "__main__":
    raise SystemExit(main())
