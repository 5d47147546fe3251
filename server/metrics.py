"""Prometheus metrics, all prefixed ``peo_`` and in base units (seconds, bytes)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    """The server's metrics, registered on a registry of their own so apps never share state."""

    def __init__(self):
        self.registry = CollectorRegistry()
        registry = self.registry

        # requests
        self.requests = Counter(
            "peo_requests",
            "HTTP requests by route and status code",
            ["route", "status"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "peo_request_duration_seconds",
            "Time from request arrival to the last byte of the response",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.time_to_first_token = Histogram(
            "peo_time_to_first_token_seconds",
            "Time from request arrival to the first generated token",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

        # generation
        self.generated_tokens = Counter(
            "peo_generated_tokens", "Tokens generated", registry=registry
        )
        self.prompt_tokens = Counter(
            "peo_prompt_tokens", "Prompt tokens processed", registry=registry
        )
        self.generations_finished = Counter(
            "peo_generations_finished",
            "Finished generations by finish reason (stop, length, cancelled, shutdown, error)",
            ["reason"],
            registry=registry,
        )

        # fusion and the fused-model cache
        self.fusion_duration = Histogram(
            "peo_fusion_duration_seconds",
            "Time to fuse one coefficient pair",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.cache_hits = Counter(
            "peo_fused_cache_hits", "Fused-model cache hits", registry=registry
        )
        self.cache_misses = Counter(
            "peo_fused_cache_misses", "Fused-model cache misses", registry=registry
        )
        self.cache_evictions = Counter(
            "peo_fused_cache_evictions", "Fused models evicted", registry=registry
        )
        self.cache_entries = Gauge(
            "peo_fused_cache_entries", "Fused models in the cache", registry=registry
        )
        self.cache_bytes = Gauge(
            "peo_fused_cache_bytes", "Bytes held by cached fused weights", registry=registry
        )
        self.task_vector_bytes = Gauge(
            "peo_task_vector_bytes", "Bytes held by loaded task vectors", registry=registry
        )

        # the decode loop
        self.engine_requests = Counter(
            "peo_engine_requests",
            "Generations started, by engine path (fused or unfused)",
            ["engine"],
            registry=registry,
        )
        self.rows_moved = Counter(
            "peo_rows_moved_to_unfused",
            "Running fused generations moved into the unfused batch once preferences mixed",
            registry=registry,
        )
        self.batch_size = Histogram(
            "peo_decode_batch_size",
            "Rows in each decode step of one model",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=registry,
        )

        # admission
        self.in_flight = Gauge(
            "peo_requests_in_flight",
            "Generation requests admitted and not finished",
            registry=registry,
        )
        self.queued = Gauge(
            "peo_requests_queued", "Generation requests waiting for a slot", registry=registry
        )
