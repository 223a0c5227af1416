"""Training metrics against a real Pushgateway binary: names, grouping by run_id, values, and failure handling."""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port
from training import train
from training.pushgateway import METRIC_NAMES, TrainingMetrics

PUSHGATEWAY = shutil.which("prometheus-pushgateway") or shutil.which("pushgateway")
SAMPLE = Path(__file__).resolve().parents[1] / "fixtures" / "dolly_sample.jsonl"


@pytest.fixture
def pushgateway(tmp_path: Path) -> Iterator[str]:
    """A private Pushgateway on a free loopback port; its URL."""
    if PUSHGATEWAY is None:
        pytest.skip("prometheus-pushgateway binary not installed (Debian package prometheus-pushgateway)")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [PUSHGATEWAY, f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("pushgateway did not become ready") from None
                time.sleep(0.05)
        yield url
    finally:
        process.kill()
        process.wait()


def scraped(url: str, run_id: str) -> dict[str, float]:
    """Values of the router_training_* series the gateway exposes for one run."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
        text = response.read().decode()
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in METRIC_NAMES and sample.labels.get("run_id") == run_id:
                assert sample.labels["job"] == "router_training"
                values[sample.name] = sample.value
    return values


def test_metric_names_are_the_dashboards_names() -> None:
    assert METRIC_NAMES == (
        "router_training_loss",
        "router_training_learning_rate",
        "router_training_grad_norm",
        "router_training_samples_per_second",
        "router_training_epoch",
        "router_training_val_loss",
        "router_training_val_accuracy",
        "router_training_val_f1",
    )


def test_pushed_values_are_grouped_by_run_id(pushgateway: str) -> None:
    first, second = TrainingMetrics(pushgateway, "run-a"), TrainingMetrics(pushgateway, "run-b")
    first.set(loss=0.25, learning_rate=1e-4, val_accuracy=0.5)
    second.set(loss=0.75)
    assert first.push() and second.push()
    run_a = scraped(pushgateway, "run-a")
    assert set(run_a) == set(METRIC_NAMES)
    assert run_a["router_training_loss"] == 0.25
    assert run_a["router_training_learning_rate"] == 1e-4
    assert run_a["router_training_val_accuracy"] == 0.5
    assert scraped(pushgateway, "run-b")["router_training_loss"] == 0.75


def test_a_failed_push_is_reported_not_raised() -> None:
    metrics = TrainingMetrics(f"http://127.0.0.1:{free_port()}", "nobody-listens")
    metrics.set(loss=1.0)
    assert metrics.push() is False


def test_training_pushes_step_and_epoch_metrics(pushgateway: str, tmp_path: Path, fast_model: Path) -> None:
    """A real (tiny) training run: the last pushed validation values are the ones in its report."""
    report = train.train(
        train.parse_args(
            [
                "--output-dir",
                str(tmp_path / "model"),
                "--data",
                str(SAMPLE),
                "--base-model",
                str(fast_model),
                "--method",
                "full",
                "--max-epochs",
                "2",
                "--batch-size",
                "8",
                "--max-length",
                "64",
                "--log-interval",
                "2",
                "--run-id",
                "test-run",
                "--pushgateway-url",
                pushgateway,
            ]
        )
    )
    values = scraped(pushgateway, "test-run")
    assert set(values) == set(METRIC_NAMES)
    best = report["metrics"]["best_validation"]
    assert values["router_training_val_loss"] == pytest.approx(best["loss"])
    assert values["router_training_val_accuracy"] == pytest.approx(best["accuracy"])
    assert values["router_training_val_f1"] == pytest.approx(best["f1"])
    assert values["router_training_epoch"] == pytest.approx(2.0)
    assert values["router_training_loss"] > 0
    assert values["router_training_grad_norm"] > 0
    assert values["router_training_samples_per_second"] > 0
    assert 0 <= values["router_training_learning_rate"] < 5e-5  # decayed linearly from the peak towards 0
