"""Evaluation: calibration and temperature maths, and a full run on tiny models whose answers are known exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from router.config import Settings
from training import evaluate

SAMPLE = Path(__file__).resolve().parents[1] / "fixtures" / "dolly_sample.jsonl"
# The fixture's test split (seed 42): 5 examples, 2 fast-path and 3 slow-path ones.
FAST_TEST, SLOW_TEST = 2, 3


def run(model: Path, tmp_path: Path, *extra: str) -> dict:
    args = ["--model", str(model), "--data", str(SAMPLE), "--output", str(tmp_path / "report.json"), *extra]
    return evaluate.evaluate(evaluate.parse_args(args))


def test_expected_calibration_error() -> None:
    confidence = np.array([0.9, 0.9, 0.6, 0.6])
    correct = np.array([1.0, 1.0, 1.0, 0.0])
    # bin 0.9: accuracy 1 vs 0.9 → 0.1; bin 0.6: accuracy 0.5 vs 0.6 → 0.1; each half the data
    assert evaluate.expected_calibration_error(confidence, correct) == pytest.approx(0.1)
    assert evaluate.expected_calibration_error(np.array([0.75, 0.75]), np.array([1.0, 0.0])) == pytest.approx(0.25)


def test_temperature_keeps_decisions_and_fits_overconfidence() -> None:
    p = np.array([0.01, 0.3, 0.7, 0.99])
    scaled = evaluate.apply_temperature(p, 2.0)
    assert ((scaled >= 0.5) == (p >= 0.5)).all()
    assert scaled[0] > p[0] and scaled[3] < p[3]
    assert evaluate.apply_temperature(p, 1.0) == pytest.approx(p)
    # Always 0.99 sure, right 3 times in 4: the fitted temperature softens the margin towards P = 0.75.
    temperature = evaluate.fit_temperature(np.full(4, 0.99), np.array([1, 1, 1, 0]))
    assert evaluate.apply_temperature(np.array([0.99]), temperature)[0] == pytest.approx(0.75, abs=0.01)


def test_routing_sends_unsure_fast_answers_to_the_slow_path() -> None:
    p_slow = np.array([0.1, 0.4, 0.9])  # fast at 0.9, fast at 0.6, slow at 0.9
    y_true = np.array([0, 1, 1])
    report, _ = evaluate.assess(p_slow, y_true, Settings(), threshold=0.7)
    assert report["model"]["confusion_matrix"] == [[1, 0], [1, 1]]
    assert report["routed"]["confusion_matrix"] == [[1, 0], [0, 2]]
    assert report["routed"]["slow_to_fast_rate"] == 0.0 and report["routed"]["fast_share"] == pytest.approx(1 / 3)
    sweep = {row["threshold"]: row for row in report["threshold_sweep"]}
    assert sweep[0.5]["slow_to_fast_rate"] == 0.5 and sweep[0.95]["fast_share"] == 0.0


def test_a_model_that_always_answers_fast(fast_model: Path, tmp_path: Path) -> None:
    """fast_model: label "0" at 0.9975 for every text — above the 0.99 default threshold, below 0.999."""
    report = run(fast_model, tmp_path, "--temperature-scaling")
    assert report["split_sizes"] == {"train": 32, "validation": 4, "test": 5}
    assert report["model"]["confusion_matrix"] == [[FAST_TEST, 0], [SLOW_TEST, 0]]
    assert report["model"]["accuracy"] == pytest.approx(FAST_TEST / 5)
    assert report["model"]["per_label"]["1"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": SLOW_TEST}
    assert report["routed"]["threshold"] == 0.99 and report["routed"]["slow_to_fast_rate"] == 1.0
    assert report["ece"] == pytest.approx(abs(FAST_TEST / 5 - 0.99753), abs=1e-3)
    sweep = {row["threshold"]: row for row in report["threshold_sweep"]}
    assert sweep[0.995]["fast_share"] == 1.0 and sweep[0.999]["fast_share"] == 0.0
    assert report["out_of_scope"] == {
        c: {"count": 6, "routed_fast_share": 1.0} for c in ("brainstorming", "closed_qa", "information_extraction")
    }
    scaled = report["temperature_scaled"]
    assert scaled["model"]["confusion_matrix"] == report["model"]["confusion_matrix"]  # same decisions
    assert scaled["temperature"] > 0
    assert json.loads((tmp_path / "report.json").read_text()) == report
    for name in ("confusion_matrix.png", "confidence_histogram.png", "threshold_curve.png"):
        png = (tmp_path / name).read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) < 100_000


def test_threshold_flag_and_a_slow_model(slow_model: Path, tmp_path: Path) -> None:
    """slow_model: label "1" at 0.881 for every text; routing never changes a slow answer."""
    report = run(slow_model, tmp_path, "--threshold", "0.95")
    assert report["model"]["confusion_matrix"] == [[0, FAST_TEST], [0, SLOW_TEST]]
    assert report["model"]["per_label"]["1"]["recall"] == 1.0
    assert report["routed"]["confusion_matrix"] == report["model"]["confusion_matrix"]
    assert report["routed"]["threshold"] == 0.95 and report["routed"]["fast_share"] == 0.0
