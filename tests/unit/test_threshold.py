"""A model's own routing threshold: chosen on validation predictions, shipped in routing.json, read back first."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from router.config import Settings
from router.model import ROUTING_FILE, ModelLoadError, shipped_threshold
from router.routing import FALLBACK_THRESHOLD, Threshold, pick_threshold
from training import evaluate, threshold

SAMPLE = Path(__file__).resolve().parents[1] / "fixtures" / "dolly_sample.jsonl"


def test_choose_takes_the_lowest_candidate_that_keeps_slow_queries_off_the_fast_path() -> None:
    # 200 slow-path queries: one answered fast at 0.96, one at 0.985; the rest slow. 100 fast-path queries at 0.999.
    p_slow = np.concatenate([[0.04, 0.015], np.full(198, 0.9), np.full(100, 0.001)])
    labels = np.concatenate([np.ones(200, dtype=int), np.zeros(100, dtype=int)])
    # At most 1 of 200 (0.5%) may go fast: 0.97 leaves only the 0.985 one; 0.95 leaves both.
    choice = threshold.choose(p_slow, labels, 0.005, Settings())
    assert choice["confidence_threshold"] == 0.97 and choice["target_met"] is True
    assert choice["chosen_on"]["slow_to_fast_rate"] == pytest.approx(1 / 200)
    assert choice["chosen_on"]["fast_share"] == pytest.approx(101 / 300)
    assert choice["chosen_on"]["records"] == 300 and choice["chosen_on"]["slow_path_records"] == 200
    # None may go fast: the next candidate above 0.985.
    assert threshold.choose(p_slow, labels, 0.0, Settings())["confidence_threshold"] == 0.99


def test_choose_falls_back_to_the_highest_candidate_and_says_so() -> None:
    p_slow = np.array([0.0001, 0.0001, 0.9])  # both slow-path queries answered fast at 0.9999
    choice = threshold.choose(p_slow, np.array([1, 1, 0]), 0.005, Settings())
    assert choice["confidence_threshold"] == max(threshold.CANDIDATES) and choice["target_met"] is False


def test_the_setting_wins_then_the_model_then_the_fallback() -> None:
    assert pick_threshold(0.7, 0.98) == Threshold(0.7, "setting")
    assert pick_threshold(None, 0.98) == Threshold(0.98, "model")
    assert pick_threshold(None, None) == Threshold(FALLBACK_THRESHOLD, "fallback")


def test_shipped_threshold_reads_routing_json_and_rejects_a_broken_one(tmp_path: Path) -> None:
    assert shipped_threshold(tmp_path) is None
    (tmp_path / ROUTING_FILE).write_text(json.dumps({"confidence_threshold": 0.97}))
    assert shipped_threshold(tmp_path) == 0.97
    for broken in ("{not json", json.dumps({"threshold": 0.9}), json.dumps({"confidence_threshold": 1.5})):
        (tmp_path / ROUTING_FILE).write_text(broken)
        with pytest.raises(ModelLoadError, match=ROUTING_FILE):
            shipped_threshold(tmp_path)


def test_cli_writes_routing_json_that_evaluate_then_uses(fast_model: Path, tmp_path: Path) -> None:
    """fast_model answers "0" at 0.99753 for every text, so any slow-path query in validation goes fast below 0.999:
    only 0.999 keeps them off the fast path, and evaluate routes the test split with it."""
    model = shutil.copytree(fast_model, tmp_path / "model")
    threshold.main(["--model", str(model), "--data", str(SAMPLE)])
    routing = json.loads((model / ROUTING_FILE).read_text())
    assert routing["confidence_threshold"] == 0.999 and routing["target_met"] is True
    assert routing["chosen_on"]["split"] == "validation" and routing["chosen_on"]["records"] == 4
    assert routing["chosen_on"]["fast_share"] == 0.0

    report = evaluate.evaluate(
        evaluate.parse_args(["--model", str(model), "--data", str(SAMPLE), "--output", str(tmp_path / "r.json")])
    )
    assert report["threshold_source"] == "model" and report["routed"]["threshold"] == 0.999
    assert report["routed"]["fast_share"] == 0.0
