"""Every setting of the router, read once from the environment.

One class, one place: each field is an environment variable of the same name in upper case. Invalid values fail
at start with pydantic's message, which names the variable.
"""

from __future__ import annotations

import os
from typing import Literal

from bentoml._internal.resource import query_cgroup_cpu_count  # pinned: bentoml==1.4.40
from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def cpu_count() -> int:
    """CPUs this server may use: the cgroup's quota where one is set (a container's `--cpus`, a pod's CPU limit, as
    BentoML counts them), within the cores the process may run on."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(int(query_cgroup_cpu_count()), usable))


class Settings(BaseSettings):
    """Router configuration (environment variables, case-insensitive)."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    # --- model ---
    model_path: str | None = Field(
        None, description="Local Hugging Face model folder; used first when it holds a model."
    )
    hf_model_id: str | None = Field(
        None, description="Hub repo id downloaded with snapshot_download when MODEL_PATH is unset."
    )
    hf_model_revision: str | None = Field(None, description="Hub revision (commit sha or tag) to pin in production.")
    model_device: Literal["cpu", "cuda", "mps"] = Field("cpu", description="Device the model runs on.")
    model_backend: Literal["onnx-int8", "onnx", "torch-int8", "torch"] = Field(
        "onnx-int8", description="onnx-int8, onnx, torch-int8 (CPU) or torch (fp32, any device)."
    )
    max_length: int = Field(
        128, ge=8, le=512, description="Token limit per text (= training length); longer is truncated."
    )
    onnx_cache_dir: str = Field(
        "~/.cache/query-router/onnx",
        description="Exported ONNX graphs are kept here, so a restart skips the export; empty disables the cache.",
    )
    service_workers: int = Field(
        0,
        ge=0,
        le=64,
        description="Worker processes, each with its own event loop, model and L1; 0 = one per CPU (<= 8), 1 on a GPU.",
    )
    model_workers: int = Field(
        0, ge=0, le=64, description="Forward passes side by side in each worker; 0 = its share of the CPUs, 1 on a GPU."
    )
    torch_threads: int = Field(
        0, ge=0, le=64, description="Intra-op threads of each forward pass; 0 = a worker's CPUs / MODEL_WORKERS."
    )

    # --- batching (BentoML adaptive batching of the model call) ---
    max_batch_size: int = Field(
        32, ge=2, le=1024, description="Largest batch BentoML forms for one forward pass (one worker's)."
    )
    max_latency_ms: int = Field(
        1000,
        ge=1,
        le=60000,
        description="Latency budget of a cache miss: 503 at once when the model's pace can't meet it.",
    )

    # A backstop only: MAX_LATENCY_MS (the batcher's cost model) decides admission. At 128 it refused 150 clients'
    # misses that the budget had room for (docs/performance.md).
    max_queue: int = Field(
        1024, ge=1, description="Most cache misses waiting for the model at once; beyond it: 503 (after SHED_DELAY_MS)."
    )
    shed_delay_ms: int = Field(
        250,
        ge=0,
        le=5000,
        description="An overload 503 is sent after this pause, pacing clients that retry at once (0: no pause).",
    )

    # --- API ---
    max_text_chars: int = Field(2048, ge=1, description="Longest accepted text (characters as sent).")
    max_batch_texts: int = Field(64, ge=1, le=1024, description="Most texts one call of the batch route takes.")
    max_body_bytes: int = Field(65536, ge=1024, description="Largest accepted request body.")
    request_timeout_sec: float = Field(
        30,
        gt=0,
        le=3600,
        description="A request with no answer started after this gets a 408 (body not all sent) or a 504.",
    )

    # --- cache ---
    cache_l1_size: int = Field(10000, ge=0, description="Entries in the in-process L1 cache; 0 disables it.")
    cache_l1_ttl_sec: float = Field(300, gt=0, description="L1 entry lifetime.")
    redis_url: str | None = Field(None, description="Redis URL for the shared L2 cache; unset disables L2.")
    cache_l2_ttl_sec: int = Field(3600, gt=0, description="L2 (Redis) entry lifetime.")
    redis_timeout_ms: int = Field(50, ge=1, le=10000, description="Per-command Redis timeout; L2 is skipped past it.")
    redis_retry_sec: float = Field(5.0, gt=0, description="First back-off after a Redis failure (doubles, max 60 s).")
    redis_key_prefix: str = Field("qr:", description="Prefix of every Redis key (namespaces deployments and tests).")

    # --- routing ---
    confidence_threshold: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Fast-path answers below this go slow. Unset: the model's own (its routing.json), else 0.99.",
    )
    fast_label: str = Field("0", description="Label of the fast path in the model's id2label.")
    slow_label: str = Field("1", description="Label of the slow path in the model's id2label.")

    # --- access ---
    api_key: str | None = Field(None, description="When set, API routes need `Authorization: Bearer <API_KEY>`.")

    # --- logging ---
    access_log: bool = Field(
        True, description="A log line per request (router.logs.AccessLog); probes and /metrics aside."
    )
    trace_requests: bool = Field(
        False, description="OpenTelemetry spans for the API routes (BentoML's tracing exporter settings apply)."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")
    log_format: Literal["json", "console"] = Field("console", description="Log line format.")

    def processes(self) -> int:
        """BentoML worker processes. One per CPU: each has its own event loop, and one loop was the limit on a fast
        CPU: on 2 cores two workers of one pass each answered 1.04-1.7x the cache misses and 1.6-2.0x the hits of one
        worker running two passes (docs/performance.md). Each worker listens on its own socket (router.workers)."""
        return self.service_workers or (min(cpu_count(), 8) if self.model_device == "cpu" else 1)

    def parallelism(self) -> tuple[int, int]:
        """(forward passes at once, intra-op threads each), in one worker process. Single-threaded passes: on 2 cores
        two of them side by side did 1.3x the queries/s of one pass on two threads, since small matrices
        parallelise poorly and a thread preempted by the event loop stalls the whole pass it belongs to."""
        cores = max(1, cpu_count() // self.processes())
        workers = self.model_workers or (min(cores, 8) if self.model_device == "cpu" else 1)
        return workers, self.torch_threads or max(1, cores // workers)

    def forward_passes(self) -> int:
        """Forward passes the whole server runs at once (every worker's): the model-alone reference runs as many."""
        return self.processes() * self.parallelism()[0]

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _labels_differ(self) -> Settings:
        if self.fast_label == self.slow_label:
            raise ValueError("FAST_LABEL and SLOW_LABEL must differ")
        return self
