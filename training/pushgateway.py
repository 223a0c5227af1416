"""Training progress as Prometheus gauges, pushed to a Pushgateway: a training job is too short-lived to scrape.

Every push is grouped by `run_id`, so runs never overwrite each other. The gauge names are fixed: the Grafana
dashboards query them by name.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, push_to_gateway
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

log = logging.getLogger(__name__)

JOB = "router_training"
METRIC_NAMES = (
    "router_training_loss",
    "router_training_learning_rate",
    "router_training_grad_norm",
    "router_training_samples_per_second",
    "router_training_epoch",
    "router_training_val_loss",
    "router_training_val_accuracy",
    "router_training_val_f1",
)
_HELP = {
    "router_training_loss": "Training loss, mean over the last logging interval.",
    "router_training_learning_rate": "Current learning rate.",
    "router_training_grad_norm": "Gradient norm before clipping at the last logged step.",
    "router_training_samples_per_second": "Training throughput over the last logging interval.",
    "router_training_epoch": "Fractional epoch of the last update.",
    "router_training_val_loss": "Validation loss at the last evaluation.",
    "router_training_val_accuracy": "Validation accuracy at the last evaluation.",
    "router_training_val_f1": "Validation macro F1 at the last evaluation.",
}


class TrainingMetrics:
    """The run's gauges in their own registry, pushed as one group per `run_id`."""

    def __init__(self, url: str, run_id: str) -> None:
        self.url = url
        self.run_id = run_id
        self.registry = CollectorRegistry()
        self.gauges = {name: Gauge(name, _HELP[name], registry=self.registry) for name in METRIC_NAMES}

    def set(self, **values: float) -> None:
        """Set gauges by short name (`loss=0.3` sets router_training_loss)."""
        for short, value in values.items():
            self.gauges[f"router_training_{short}"].set(value)

    def push(self) -> bool:
        """Push the current values; a failure is logged and returns False, never stops training."""
        try:
            push_to_gateway(self.url, job=JOB, grouping_key={"run_id": self.run_id}, registry=self.registry)
        except OSError as exc:  # URLError, connection refused, timeouts, HTTP errors are all OSErrors
            log.warning("pushgateway push to %s failed: %s", self.url, exc)
            return False
        return True


class PushgatewayCallback(TrainerCallback):
    """Pushes step metrics at each Trainer log (every `logging_steps`) and validation metrics at each evaluation."""

    def __init__(self, metrics: TrainingMetrics) -> None:
        self.metrics = metrics
        self._last_time = time.perf_counter()
        self._last_step = 0

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any) -> None:
        self._last_time = time.perf_counter()
        self._last_step = state.global_step

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **_: Any,
    ) -> None:
        if not logs or "loss" not in logs:
            return  # evaluation and end-of-training summaries are handled elsewhere
        now = time.perf_counter()
        samples = (state.global_step - self._last_step) * args.train_batch_size * args.gradient_accumulation_steps
        if now > self._last_time and samples > 0:
            self.metrics.set(samples_per_second=samples / (now - self._last_time))
        self._last_time, self._last_step = now, state.global_step
        self.metrics.set(loss=logs["loss"], epoch=state.epoch or 0.0)
        if "learning_rate" in logs:
            self.metrics.set(learning_rate=logs["learning_rate"])
        if logs.get("grad_norm") is not None:
            self.metrics.set(grad_norm=logs["grad_norm"])
        self.metrics.push()

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, float] | None = None,
        **_: Any,
    ) -> None:
        if not metrics:
            return
        self.metrics.set(
            val_loss=metrics["eval_loss"],
            val_accuracy=metrics["eval_accuracy"],
            val_f1=metrics["eval_f1"],
            epoch=state.epoch or 0.0,
        )
        self.metrics.push()
