"""Python stubs generated from ``proto/dpo/v1/dpo_service.proto`` (package ``dpo.v1``).

Do not edit: regenerate with ``scripts/gen_proto.sh`` (``make proto``).
"""
