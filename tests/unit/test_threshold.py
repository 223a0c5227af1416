"""A model's own routing threshold: chosen on validation predictions, shipped in routing.json, read back first."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from router.model import EMBEDDED_DIR, ROUTING_FILE, ModelLoadError, shipped_threshold
from router.routing import FALLBACK_THRESHOLD, Threshold, pick_threshold
from training import evaluate, threshold

SAMPLE = Path(__file__).resolve().parents[1] / "fixtures" / "dolly_sample.jsonl"


def test_choose_sends_the_least_confident_share_of_fast_answers_slow() -> None:
    # 100 fast answers with confidences 0.9000, 0.9010, ..., 0.9990 (one of them for a slow-path query), 100 slow ones.
    fast_confidence = 0.9 + np.arange(100) / 1000
    p_slow = np.concatenate([1 - fast_confidence, np.full(100, 0.9)])
    labels = np.concatenate([np.zeros(100, dtype=int), np.ones(100, dtype=int)])
    labels[5] = 1  # a slow-path query answered fast at 0.905: under the threshold, so routed slow
    choice = threshold.choose(p_slow, labels, unsure_fast_share=0.08, margin_logits=0.0)
    assert choice["confidence_threshold"] == 0.9079  # the 8th percentile, rounded down to 4 decimals
    measured = choice["chosen_on"]
    assert measured["fast_share"] == pytest.approx(92 / 200)
    assert measured["slow_to_fast_rate"] == 0.0 and choice["target_met"] is True
    assert measured["fast_to_slow_rate"] == pytest.approx(7 / 99)
    assert measured["records"] == 200 and measured["slow_path_records"] == 101
    # The same answers from a model whose confidences top out lower: the threshold moves with them.
    lower = threshold.choose(1 - (1 - p_slow) * 0.99, labels, unsure_fast_share=0.08, margin_logits=0.0)
    assert lower["confidence_threshold"] < choice["confidence_threshold"]
    assert lower["chosen_on"]["fast_share"] == pytest.approx(92 / 200)
    # The margin lowers the quantile by 0.5 logits: 0.9079 → 0.8568, so the unsure slow-path query now goes fast.
    margin = threshold.choose(p_slow, labels, unsure_fast_share=0.08, margin_logits=0.5)
    assert margin["confidence_threshold"] == 0.8567 and margin["margin_logits"] == 0.5
    assert margin["chosen_on"]["slow_to_fast_rate"] == pytest.approx(1 / 101)


def test_choose_reports_a_missed_target() -> None:
    p_slow = np.array([0.0001, 0.0001, 0.0002, 0.9])  # both slow-path queries answered fast, at the top
    choice = threshold.choose(p_slow, np.array([1, 1, 0, 0]), unsure_fast_share=0.08)
    assert choice["chosen_on"]["slow_to_fast_rate"] == 1.0 and choice["target_met"] is False


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
    """fast_model answers "0" at 0.99753 for every text: the threshold sits 0.5 logits under that (0.9959), so every
    answer stays fast; a routing.json written by hand at 0.999 sends them all slow, and evaluate follows it."""
    model = shutil.copytree(fast_model, tmp_path / "model")
    threshold.main(["--model", str(model), "--data", str(SAMPLE)])
    routing = json.loads((model / ROUTING_FILE).read_text())
    assert routing["confidence_threshold"] == 0.9959
    assert routing["chosen_on"]["split"] == "validation" and routing["chosen_on"]["records"] == 4
    assert routing["chosen_on"]["backend"] == "torch"  # fp32: the same answers on every CPU
    assert routing["chosen_on"]["fast_share"] == 1.0 and routing["target_met"] is False  # it sends slow ones fast

    def evaluated() -> dict:
        args = ["--model", str(model), "--data", str(SAMPLE), "--output", str(tmp_path / "r.json")]
        return evaluate.evaluate(evaluate.parse_args(args))

    report = evaluated()
    assert report["threshold_source"] == "model" and report["routed"]["fast_share"] == 1.0
    (model / ROUTING_FILE).write_text(json.dumps({"confidence_threshold": 0.999}))
    report = evaluated()
    assert report["routed"]["threshold"] == 0.999 and report["routed"]["fast_share"] == 0.0


def test_the_embedded_model_ships_its_threshold() -> None:
    """The default model routes with the threshold chosen for it, not with the fallback."""
    routing = json.loads((EMBEDDED_DIR / ROUTING_FILE).read_text())
    assert shipped_threshold(EMBEDDED_DIR) == routing["confidence_threshold"]
    assert 0.5 < routing["confidence_threshold"] < 1.0
    assert routing["chosen_on"]["split"] == "validation" and routing["chosen_on"]["slow_path_records"] > 0
    # What the rule measured at its choice is recorded, met or not (docs/model-card.md: the two slow-path records
    # the embedded model sends fast on validation are ones whose dolly category contradicts the label rule).
    assert routing["target_met"] == (routing["chosen_on"]["slow_to_fast_rate"] <= routing["max_slow_to_fast"])
