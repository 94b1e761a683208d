"""Engine events → Prometheus metrics.

The engine calls these hooks; this module owns the metric objects. Each :class:`EngineEvents`
has its own registry so several servers in one process (tests) do not collide.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class EngineEvents:
    """Metric hooks; every method is cheap and thread-safe (prometheus_client locks)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._request_metrics(self.registry)
        self._training_metrics(self.registry)
        self._checkpoint_metrics(self.registry)
        self._reference_cache_metrics(self.registry)

    def _request_metrics(self, r: CollectorRegistry) -> None:
        """Requests, latency, queueing and batching."""
        self.requests = Counter(
            "dpo_requests",
            "Requests by endpoint, protocol and result code.",
            ["endpoint", "protocol", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "dpo_request_latency_seconds",
            "Request latency (seconds).",
            ["endpoint", "protocol"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "dpo_queue_time_seconds",
            "Time from admission to the worker (seconds).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_requests = Histogram(
            "dpo_batch_requests",
            "Requests coalesced per forward pass.",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.batch_pairs = Histogram(
            "dpo_batch_pairs",
            "Pairs per forward pass.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.tokens = Counter("dpo_tokens", "Tokens processed.", registry=r)
        self.queue_depth = Gauge("dpo_queue_depth", "Requests waiting for the engine.", registry=r)
        self.in_flight = Gauge("dpo_in_flight", "Requests admitted and not finished.", registry=r)

    def _training_metrics(self, r: CollectorRegistry) -> None:
        """Optimizer steps, drops and the model version."""
        self.steps = Counter("dpo_optimizer_steps", "Optimizer steps applied.", registry=r)
        self.rejected_steps = Counter(
            "dpo_rejected_steps",
            "Train steps not applied (non-finite loss or gradient).",
            registry=r,
        )
        self.dropped = Counter(
            "dpo_dropped_requests", "Requests dropped before the model.", ["reason"], registry=r
        )
        self.overload = Counter(
            "dpo_overload_rejections", "Requests refused: queue full.", registry=r
        )
        self.last_train_loss = Gauge(
            "dpo_last_train_loss", "Loss of the last applied step.", registry=r
        )
        self.model_version = Gauge(
            "dpo_model_version", "Optimizer steps applied so far.", registry=r
        )

    def _checkpoint_metrics(self, r: CollectorRegistry) -> None:
        """Checkpoint writes."""
        self.checkpoints = Counter("dpo_checkpoints", "Checkpoints written.", registry=r)
        self.checkpoint_failures = Counter(
            "dpo_checkpoint_failures", "Checkpoint writes that failed.", registry=r
        )
        self.checkpoint_seconds = Histogram(
            "dpo_checkpoint_seconds",
            "Time to write one checkpoint (seconds).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.checkpoint_version = Gauge(
            "dpo_last_checkpoint_version", "Model version of the newest checkpoint.", registry=r
        )
        self.degraded = Gauge(
            "dpo_degraded",
            "1 while training is paused because a due checkpoint failed (loss-only requests "
            "are still served); 0 otherwise.",
            registry=r,
        )

    def _reference_cache_metrics(self, r: CollectorRegistry) -> None:
        """The reference log-prob cache (engine/reference_lookup.py)."""
        self.reference_cache = {
            what: Counter(f"dpo_reference_cache_{what}", text, registry=r)
            for what, text in (
                ("hits", "Reference log-probs (one per sequence) served from the cache."),
                ("misses", "Reference log-probs not in the cache (computed, then stored)."),
                ("evictions", "Reference cache rows evicted (least recently used)."),
            )
        }
        self.reference_cache_errors = Counter(
            "dpo_reference_cache_errors",
            "Reference cache faults (open, corrupt, read, write, damaged_row); requests go on.",
            ["kind"],
            registry=r,
        )
        self.reference_cache_entries = Gauge(
            "dpo_reference_cache_entries", "Sequences in the reference cache.", registry=r
        )
        self.reference_cache_bytes = Gauge(
            "dpo_reference_cache_bytes", "Reference cache size on disk (file + WAL).", registry=r
        )

    def on_reference_cache(self, what: str, n: int) -> None:
        if n:
            self.reference_cache[what].inc(n)

    def on_reference_cache_error(self, kind: str) -> None:
        self.reference_cache_errors.labels(kind=kind).inc()

    def on_reference_cache_size(self, entries: int, size_bytes: int) -> None:
        self.reference_cache_entries.set(entries)
        self.reference_cache_bytes.set(size_bytes)

    # engine hooks ------------------------------------------------------------------------
    def on_loaded(self, version: int) -> None:
        self.model_version.set(version)

    def on_queue_depth(self, depth: int) -> None:
        self.queue_depth.set(depth)

    def on_queue_time(self, seconds: float) -> None:
        self.queue_time.observe(max(seconds, 0.0))

    def on_batch(self, requests: int, pairs: int) -> None:
        self.batch_requests.observe(requests)
        self.batch_pairs.observe(pairs)

    def on_step(self, version: int, loss: float) -> None:
        self.steps.inc()
        self.last_train_loss.set(loss)
        self.model_version.set(version)

    def on_step_rejected(self) -> None:
        self.rejected_steps.inc()

    def on_dropped(self, reason: str) -> None:
        self.dropped.labels(reason=reason).inc()

    def on_rejected_overload(self) -> None:
        self.overload.inc()

    def on_checkpoint(self, version: int, seconds: float) -> None:
        self.checkpoints.inc()
        self.checkpoint_seconds.observe(seconds)
        self.checkpoint_version.set(version)

    def on_checkpoint_failed(self) -> None:
        self.checkpoint_failures.inc()

    def on_degraded(self, degraded: bool) -> None:
        self.degraded.set(1 if degraded else 0)

    # adapter hooks -----------------------------------------------------------------------
    def on_request(
        self, endpoint: str, protocol: str, code: str, seconds: float, tokens: int = 0
    ) -> None:
        self.requests.labels(endpoint=endpoint, protocol=protocol, code=code).inc()
        self.latency.labels(endpoint=endpoint, protocol=protocol).observe(seconds)
        if tokens:
            self.tokens.inc(tokens)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def snapshot(self) -> dict[str, Any]:
        """A few values for tests and logs."""
        return {
            "steps": self.steps._value.get(),
            "rejected_steps": self.rejected_steps._value.get(),
            "checkpoints": self.checkpoints._value.get(),
        }
