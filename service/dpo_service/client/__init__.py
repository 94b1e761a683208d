"""The Python client and the remote trainer (``dpo-service train-remote``).

Depends only on the wire contract (:mod:`dpo_service.schemas`' shapes as dicts, the
``dpo.v1`` proto stubs and their conversions, :mod:`dpo_service.errors`): no torch, no engine.
"""

from dpo_service.client.dpo_client import (
    CheckpointResult,
    DpoClient,
    ErrorCode,
    LossResult,
    ModelInfo,
    RetryPolicy,
    normalize_pair,
)
from dpo_service.client.transports import DpoClientError

__all__ = [
    "CheckpointResult",
    "DpoClient",
    "DpoClientError",
    "ErrorCode",
    "LossResult",
    "ModelInfo",
    "RetryPolicy",
    "normalize_pair",
]
