"""Choose a model's routing threshold on its own validation predictions and ship it in the model folder.

`python -m training.threshold --model DIR --data PATH`; `training.train` runs the same choice when it saves a model.

Why each model gets its own: where a trained model's confidences pile up differs from one training run to the next
(a 4-layer model meets the slow→fast target at 0.98 in one run and sends only 8% of queries fast at 0.99 in
another), so one fixed default does not carry over between models. The threshold is chosen on the validation split
(never the test split) and written to `routing.json`, which the service reads when `CONFIDENCE_THRESHOLD` is unset.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from router.config import Settings
from router.inference import Classifier
from router.model import ROUTING_FILE, ModelSource
from training import data, evaluate

log = logging.getLogger(__name__)

CANDIDATES = evaluate.SWEEP
MAX_SLOW_TO_FAST = 0.005  # issue #3: at most 0.5% of slow-path queries on the fast path


def sweep(p_slow: np.ndarray, labels: np.ndarray, settings: Settings) -> list[dict[str, float]]:
    return evaluate.assess(p_slow, labels, settings, CANDIDATES[0])[0]["threshold_sweep"]


def choose(p_slow: np.ndarray, labels: np.ndarray, max_slow_to_fast: float, settings: Settings) -> dict[str, Any]:
    """The lowest candidate (so the most queries on the fast path) whose slow→fast rate on these predictions is
    within `max_slow_to_fast`; the highest candidate, flagged `target_met: false`, when none is."""
    rows = sweep(p_slow, labels, settings)
    meeting = [row for row in rows if row["slow_to_fast_rate"] <= max_slow_to_fast]
    row = meeting[0] if meeting else rows[-1]
    return {
        "confidence_threshold": row["threshold"],
        "max_slow_to_fast": max_slow_to_fast,
        "target_met": bool(meeting),
        "chosen_on": {
            "records": len(labels),
            "slow_path_records": int((labels == data.SLOW).sum()),
            "fast_share": row["fast_share"],
            "slow_to_fast_rate": row["slow_to_fast_rate"],
            "fast_to_slow_rate": row["fast_to_slow_rate"],
        },
        "candidates": list(CANDIDATES),
    }


def choose_for_model(
    model_dir: Path, validation: list[data.Example], max_slow_to_fast: float, settings: Settings
) -> dict[str, Any]:
    """Predict the validation split with the model as the service loads it, choose, and write routing.json."""
    classifier = Classifier.load(ModelSource(path=model_dir, origin="path", name=str(model_dir)), settings)
    predictions = evaluate.predict(classifier, [e.text for e in validation], batch_size=32)
    p_slow = evaluate.slow_probability(predictions, settings.slow_label)
    choice = choose(p_slow, np.array([e.label for e in validation]), max_slow_to_fast, settings)
    choice["chosen_on"] |= {"split": "validation", "backend": settings.model_backend}
    (model_dir / ROUTING_FILE).write_text(json.dumps(choice, indent=2) + "\n")
    if not choice["target_met"]:
        log.warning("no threshold keeps slow→fast within %.3f on validation; shipping the highest", max_slow_to_fast)
    return choice


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path, help="Model folder; routing.json is written into it.")
    parser.add_argument("--data", help="Local dolly JSONL file; default: the Hub dataset " + data.HUB_DATASET)
    parser.add_argument("--seed", type=int, help="Split seed; default: the one in the model's training_report.json.")
    parser.add_argument("--max-slow-to-fast", type=float, default=MAX_SLOW_TO_FAST)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    seed = args.seed if args.seed is not None else evaluate.training_seed(args.model)
    in_scope, _ = data.to_examples(data.load_records(args.data))
    choice = choose_for_model(args.model, data.split(in_scope, seed=seed).validation, args.max_slow_to_fast, Settings())
    log.info(
        "threshold %.3f: on validation %.1f%% fast, slow→fast %.2f%%",
        choice["confidence_threshold"],
        100 * choice["chosen_on"]["fast_share"],
        100 * choice["chosen_on"]["slow_to_fast_rate"],
    )


if __name__ == "__main__":
    main()
