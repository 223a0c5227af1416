"""Every Prometheus metric of the service, defined once, and their exposition for `/metrics`.

Under `bentoml serve`, prometheus_client runs in multiprocess mode (BentoML sets PROMETHEUS_MULTIPROC_DIR before the
worker starts), so `/metrics` collects the values every worker wrote to that folder.
"""

from __future__ import annotations

import os

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CONFIDENCE_BUCKETS = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class RouterMetrics:
    """The router's metrics; tests pass their own registry."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.registry = registry
        self.requests = Counter(
            "router_requests_total", "HTTP requests by route and status code.", ["route", "status"], registry=registry
        )
        self.request_duration = Histogram(
            "router_request_duration_seconds",
            "Server-side request latency by route.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.in_progress = Gauge(
            "router_requests_in_progress",
            "HTTP requests being served, by route.",
            ["route"],
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.cache_hits = Counter(
            "router_cache_hits_total", "Cache hits by level (l1, l2).", ["level"], registry=registry
        )
        self.cache_misses = Counter(
            "router_cache_misses_total", "Cache misses by level (l1, l2).", ["level"], registry=registry
        )
        self.redis_errors = Counter(
            "router_redis_errors_total", "Failed Redis commands by operation.", ["operation"], registry=registry
        )
        self.redis_up = Gauge(
            "router_redis_up",
            "1 when the last Redis command succeeded, 0 when L2 is bypassed.",
            registry=registry,
            multiprocess_mode="liveall",
        )
        self.decisions = Counter(
            "router_decisions_total",
            "Answered texts by the model's own label and the label after confidence routing.",
            ["model_label", "routed_label"],
            registry=registry,
        )
        self.confidence = Histogram(
            "router_prediction_confidence",
            "Softmax probability of the model's top label, per answered text.",
            buckets=CONFIDENCE_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "router_batch_size", "Texts per model forward pass.", buckets=BATCH_BUCKETS, registry=registry
        )
        self.inference_duration = Histogram(
            "router_inference_duration_seconds",
            "Duration of one batched forward pass.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.shed = Counter(
            "router_shed_total",
            "Queries answered 503: the model queue was full or could not answer within MAX_LATENCY_MS.",
            registry=registry,
        )
        self.model_ready = Gauge(
            "router_model_ready",
            "1 once the model is loaded and warmed up.",
            registry=registry,
            multiprocess_mode="liveall",
        )
        self.model_info = Gauge(
            "router_model_info",
            "Constant 1, labelled with the served model.",
            ["source", "name", "identity", "trained"],
            registry=registry,
            multiprocess_mode="liveall",
        )
        self.confidence_threshold = Gauge(
            "router_confidence_threshold",
            "Routing threshold in force; source: setting (CONFIDENCE_THRESHOLD), model (its routing.json) or fallback.",
            ["source"],
            registry=registry,
            multiprocess_mode="liveall",
        )


def exposition(registry: CollectorRegistry = REGISTRY) -> bytes:
    """The text format of every metric: all workers' values in multiprocess mode, else this process's registry."""
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
    return bytes(generate_latest(registry))
