"""Typed configuration: every knob of the service, read from ``DPO_*`` environment variables.

This is the only module that reads the environment. Each field's description is what the
README's config table shows.
"""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# API keys shorter than this are refused (`openssl rand -hex 32` gives 64 characters,
# `secrets.token_urlsafe(32)` 43).
MIN_API_KEY_CHARS = 32
# Refused as keys, compared case-insensitively: the content of secrets/dpo_api_key.example and a
# few obvious placeholders (most are also caught by the length rule; listed for a clearer error).
PLACEHOLDER_API_KEYS = frozenset({
    "change-me-to-a-long-random-string",
    "changeme",
    "change-me",
    "change_me",
    "replace-me",
    "replaceme",
    "secret",
    "password",
    "example",
})  # fmt: skip
_MAKE_A_KEY = (
    'make one with: python -c "import secrets; print(secrets.token_urlsafe(32))" '
    "(or: openssl rand -hex 32)"
)


def _check_api_key(key: str, source: str) -> None:
    """Refuse a placeholder or short key; the message names ``source``, never the key."""
    if key.strip().lower() in PLACEHOLDER_API_KEYS:
        raise ValueError(f"{source} holds a placeholder, not a key; {_MAKE_A_KEY}")
    if len(key) < MIN_API_KEY_CHARS:
        raise ValueError(
            f"{source} is too short ({len(key)} characters, at least {MIN_API_KEY_CHARS} "
            f"needed); {_MAKE_A_KEY}"
        )


def _read_key_file(path: Path) -> str:
    """The stripped content of ``path``, or a ValueError that says how to fix the file."""
    source = f"DPO_API_KEY_FILE {path}"
    try:
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise ValueError(f"{source} does not exist") from None
    except PermissionError as exc:
        uid = os.geteuid() if hasattr(os, "geteuid") else "unknown"
        try:
            st = path.stat()
            found = f"mode {st.st_mode & 0o777:04o}, owner uid {st.st_uid}"
        except OSError:
            found = "mode and owner unknown"
        raise ValueError(
            f"{source} cannot be read by this process (uid {uid}; the file has {found}): "
            f"{exc.strerror}. Make it readable by uid {uid}. Docker compose bind-mounts a file "
            "secret with the host file's mode and owner, so on the host run "
            "`chmod 0644 secrets/dpo_api_key` (or `sudo chown 10001 secrets/dpo_api_key`, the "
            "image's user, to keep mode 0600; DPO_API_KEY_SECRET_FILE if you mount another "
            "file), then restart the container"
        ) from None
    except UnicodeDecodeError:
        raise ValueError(f"{source} is not UTF-8 text") from None
    except OSError as exc:
        raise ValueError(f"{source} cannot be read: {exc.strerror or exc}") from None


class StepRollback(str, Enum):
    """How a non-finite optimizer update is kept out of the model (``DPO_STEP_ROLLBACK``)."""

    VERIFY = "verify"
    SNAPSHOT = "snapshot"


class LogpStrategyName(str, Enum):
    """How chosen and rejected share the prompt in the forward pass."""

    AUTO = "auto"
    TWO_ROWS = "two_rows"
    SHARED_PREFIX = "shared_prefix"


class LogpHeadName(str, Enum):
    """Which LM head computes response log-probs with autograd (see README "Benchmarks")."""

    AUTO = "auto"
    CHUNKED = "chunked"
    STORED = "stored"


class Settings(BaseSettings):
    """Service configuration (env prefix ``DPO_``)."""

    model_config = SettingsConfigDict(
        env_prefix="DPO_",
        extra="ignore",
        validate_default=True,
        populate_by_name=True,  # WORLD_SIZE etc. (torchrun's names) also as world_size=...
        hide_input_in_errors=True,  # a refused DPO_API_KEY must never be echoed in the error
    )

    # --- network -------------------------------------------------------------------------
    host: str = Field(
        "127.0.0.1", description="Address both servers bind to (0.0.0.0 only when asked)."
    )
    port: int = Field(8000, ge=0, le=65535, description="HTTP port (0 picks a free one).")
    grpc_port: int = Field(50051, ge=0, le=65535, description="gRPC port (0 picks a free one).")
    enable_http: bool = Field(True, description="Serve the REST API.")
    enable_grpc: bool = Field(True, description="Serve the gRPC API.")
    grpc_max_message_bytes: int = Field(
        8 * 1024 * 1024,
        gt=0,
        description="Largest gRPC message received or sent, in bytes (RESOURCE_EXHAUSTED "
        "above; by default the same 8 MiB as DPO_MAX_BODY_BYTES). Pairs and token ids past "
        "their limits are counted and refused from a message's bytes, before it is parsed.",
    )

    # --- model ---------------------------------------------------------------------------
    model: str = Field(
        "builtin",
        description=(
            "`builtin` (seeded ModernDecoderLM + byte tokenizer), a directory saved by "
            "`ModernDecoderLM.save_pretrained`, or `hf:/path` to a local transformers model."
        ),
    )
    device: str = Field(
        "auto", description="`auto` (CUDA when present, else CPU), `cpu`, `cuda`, `cuda:N`."
    )
    dtype: str = Field(
        "float32",
        description=(
            "Compute dtype: float32, bfloat16 or float16. Half dtypes run the forward and "
            "backward passes under `torch.autocast`; trainable weights and AdamW state stay "
            "float32, log-prob sums and losses are float32 (see Precision)."
        ),
    )
    seed: int = Field(0, description="Seed of the built-in model's initialisation.")
    builtin_d_model: int = Field(256, gt=0, description="Built-in model: hidden size.")
    builtin_layers: int = Field(4, gt=0, description="Built-in model: decoder layers.")
    builtin_heads: int = Field(8, gt=0, description="Built-in model: attention heads.")
    builtin_kv_heads: int = Field(2, gt=0, description="Built-in model: key/value heads (GQA).")
    builtin_max_seq_len: int = Field(1024, gt=1, description="Built-in model: max positions.")
    keep_reference: bool = Field(
        False, description='Keep a frozen copy of the initial weights for `reference: "frozen"`.'
    )

    # --- optimisation --------------------------------------------------------------------
    lr: float = Field(1e-5, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW beta2.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping threshold (L2 norm).")

    # --- precision (see README "Precision") ----------------------------------------------
    step_rollback: StepRollback = Field(
        StepRollback.VERIFY,
        description=(
            "How a train step that would leave a non-finite weight is kept out: `verify` "
            "(AdamW's update is first computed on copies, one tensor at a time, and checked; "
            "no extra memory beyond one tensor) or `snapshot` (a host-memory copy of the "
            "trainable weights and optimizer state is held during each step and restored if "
            "the post-step check fails: 12 bytes per trainable parameter)."
        ),
    )

    # --- compute -------------------------------------------------------------------------
    logp_strategy: LogpStrategyName = Field(
        LogpStrategyName.AUTO, description="Prompt sharing: auto, two_rows or shared_prefix."
    )
    logp_chunk_size: int = Field(
        2048, gt=0, description="Response positions per LM-head chunk (bounds log-prob memory)."
    )
    max_batch_tokens: int = Field(
        16384, gt=0, description="Token budget of one coalesced forward pass of loss-only requests."
    )
    max_wait_ms: float = Field(
        2.0, ge=0, description="How long the batcher waits for more loss-only requests to coalesce."
    )
    dynamic_batching: bool = Field(True, description="Coalesce concurrent loss-only requests.")
    flush_denormal: bool = Field(
        True,
        description="Flush float denormals to zero on CPU (a saturated DPO sigmoid sends "
        "~1e-37 gradients through backward; denormal arithmetic slowed train steps many-fold).",
    )

    # --- compute: LM head and its memory budget (issue 15) ---------------------------------
    logp_head: LogpHeadName = Field(
        LogpHeadName.AUTO,
        description="LM head: `auto` (train steps keep the (positions × vocab) softmax for "
        "backward when it fits `DPO_MEMORY_BUDGET_MB`, the faster step; else, and without "
        "gradients, the chunked head), `chunked` or `stored`.",
    )
    memory_budget_mb: int | None = Field(
        None,
        ge=0,
        description="MiB the stored LM head may use per micro-batch (`DPO_LOGP_HEAD=auto`); 0 "
        "or unset: half the free memory at the time (CUDA: free device memory; CPU: "
        "available RAM).",
    )

    @property
    def memory_budget_bytes(self) -> int | None:
        """``memory_budget_mb`` in bytes; None (derive from the device) when 0 or unset."""
        return self.memory_budget_mb * 2**20 if self.memory_budget_mb else None

    # --- limits --------------------------------------------------------------------------
    max_pairs_per_request: int = Field(256, gt=0, description="Pairs in one request (422 above).")
    max_sequence_tokens: int | None = Field(
        None, gt=1, description="Tokens of prompt+response (default: the model's max length)."
    )
    max_request_tokens: int = Field(
        262144, gt=0, description="Tokens in one request, all sequences together (422 above)."
    )
    max_body_bytes: int = Field(
        8 * 1024 * 1024, gt=0, description="HTTP request body bytes (413 above)."
    )
    max_queue: int = Field(64, gt=0, description="Requests waiting for the engine (429 above).")
    request_timeout_s: float = Field(
        60.0, gt=0, description="Server-side deadline of a request, queueing included (504)."
    )

    # --- hostile clients: HTTP connection limits (see README "Reliability and security") ---
    max_header_bytes: int = Field(
        16 * 1024, gt=0, description="HTTP request line + headers, in bytes (431 above)."
    )
    header_timeout_s: float = Field(
        10.0, gt=0, description="Time for a request's headers to arrive once it starts (408)."
    )
    body_timeout_s: float = Field(
        30.0, gt=0, description="Time for a whole request body to arrive after its headers (408)."
    )
    max_connections: int = Field(
        512, gt=0, description="Open HTTP connections; more are answered 503 and closed."
    )

    # --- security ------------------------------------------------------------------------
    api_key: SecretStr | None = Field(
        None, description="Bearer key required for training/admin calls (or use DPO_API_KEY_FILE)."
    )
    api_key_file: Path | None = Field(None, description="File holding the API key.")
    require_key_for_loss: bool = Field(
        False, description="Require the key for loss-only calls too."
    )
    allow_unauthenticated_training: bool = Field(
        False, description="With no key configured, allow train requests anyway (loud warning)."
    )

    # --- durability ----------------------------------------------------------------------
    checkpoint_dir: Path | None = Field(None, description="Where checkpoints go; resumed at start.")
    checkpoint_every: int = Field(
        0, ge=0, description="Checkpoint every N optimizer steps (0: off)."
    )
    checkpoint_keep: int = Field(3, gt=0, description="How many checkpoints to keep.")

    # --- durability: damaged checkpoints and failed checkpoints (issue 10) -----------------
    allow_fresh_start: bool = Field(
        False,
        description="When checkpoints exist but none verifies, start from the initial weights "
        "(default: refuse to start, naming each checkpoint and why). Damaged checkpoints are "
        "kept either way.",
    )
    allow_fresh_optimizer: bool = Field(
        False,
        description="Resume a checkpoint whose weights verify but whose optimizer files do "
        "not, with a fresh optimizer (default: skip it for an older valid one, or refuse).",
    )
    checkpoint_retry_s: float = Field(
        5.0,
        gt=0,
        description="After a due checkpoint failed (training paused, degraded): seconds "
        "between retries.",
    )
    drain_timeout_s: float = Field(
        30.0, ge=0, description="SIGTERM: how long in-flight work may take."
    )

    # --- reference log-prob cache (issue 14, item 4; README "Reference log-prob cache") ---
    reference_cache: str | None = Field(
        None,
        description="SQLite file caching the frozen reference's log-probs (with "
        "DPO_KEEP_REFERENCE). Unset: `<DPO_CHECKPOINT_DIR>/reference_cache.sqlite` when a "
        "checkpoint directory is set, else off; `off` disables it.",
    )
    reference_cache_max_entries: int = Field(
        1_000_000,
        gt=0,
        description="Sequences the reference cache holds (about 120 bytes each on disk); "
        "the least recently used are evicted above it.",
    )

    @property
    def reference_cache_path(self) -> Path | None:
        """Where the reference cache lives, or None when it is off."""
        value = (self.reference_cache or "").strip()
        if value.lower() == "off":
            return None
        if value:
            return Path(value)
        if self.checkpoint_dir is not None:
            return self.checkpoint_dir / "reference_cache.sqlite"
        return None

    # --- sessions: LoRA adapters on a shared base (issue 12; README "Sessions and LoRA") ---
    max_sessions: int = Field(
        8,
        ge=0,
        description="Training sessions (LoRA adapters) held at once; creating one more is "
        "refused (429 / RESOURCE_EXHAUSTED). 0 disables sessions.",
    )

    # --- past one device: torchrun worlds (issue 13; README "Past one device") -------------
    parallel: Literal["auto", "ddp", "fsdp"] = Field(
        "auto",
        description="Under torchrun: `ddp` (every rank holds the whole policy), `fsdp` "
        "(FSDP2 shards the policy, its gradients and AdamW moments), or `auto`: ddp when "
        "16 bytes per trainable parameter plus the frozen reference fit in 80% of one "
        "device, else fsdp.",
    )
    dist_backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto",
        description="torch.distributed backend under torchrun (auto: nccl on CUDA, gloo on CPU).",
    )
    dist_timeout_s: float = Field(
        120.0,
        gt=0,
        description="A collective between ranks that takes longer fails the world (the "
        "service goes not-ready and exits 4).",
    )
    dist_heartbeat_s: float = Field(
        2.0,
        gt=0,
        description="Under torchrun, rank 0 checks every rank is alive this often, between "
        "batches (a dead rank makes the service not-ready and exit 4).",
    )
    world_size: int = Field(
        1, ge=1, validation_alias="WORLD_SIZE", description="Set by torchrun (`WORLD_SIZE`)."
    )
    rank: int = Field(0, ge=0, validation_alias="RANK", description="Set by torchrun (`RANK`).")
    local_rank: int = Field(
        0, ge=0, validation_alias="LOCAL_RANK", description="Set by torchrun (`LOCAL_RANK`)."
    )
    local_world_size: int = Field(
        1,
        ge=1,
        validation_alias="LOCAL_WORLD_SIZE",
        description="Set by torchrun (`LOCAL_WORLD_SIZE`).",
    )

    log_level: str = Field("info", description="Log level.")

    @field_validator("dtype")
    @classmethod
    def _check_dtype(cls, value: str) -> str:
        if value not in {"float32", "bfloat16", "float16"}:
            raise ValueError("dtype must be float32, bfloat16 or float16")
        return value

    @model_validator(mode="after")
    def _load_key_file(self) -> Settings:
        if self.api_key is None and self.api_key_file is not None:
            key = _read_key_file(self.api_key_file)
            if not key:
                raise ValueError(f"DPO_API_KEY_FILE {self.api_key_file} is empty")
            _check_api_key(key, f"DPO_API_KEY_FILE {self.api_key_file}")
            self.api_key = SecretStr(key)
        elif self.api_key is not None and self.api_key.get_secret_value():
            _check_api_key(self.api_key.get_secret_value(), "DPO_API_KEY")
        return self

    def api_key_value(self) -> str | None:
        """The configured API key, or None when the service runs without one."""
        if self.api_key is None:
            return None
        value = self.api_key.get_secret_value()
        return value or None
