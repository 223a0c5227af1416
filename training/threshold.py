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
import math
from pathlib import Path
from typing import Any

import numpy as np

from router.config import Settings
from router.inference import Classifier
from router.model import ROUTING_FILE, ModelSource
from training import data, evaluate

log = logging.getLogger(__name__)

# The threshold sits MARGIN_LOGITS below the UNSURE_FAST_SHARE quantile of the model's fast-answer confidences on
# validation (fp32). Chosen by cross-validation (`training.crossval`: each fold's model routes its test part at the
# threshold chosen on its own validation part): 0.40% / 0.45% of slow-path queries fast with 30.7% / 30.6% of all
# queries fast, for 6 / 4 layers. The margin keeps the threshold clear of the pile of saturated fast answers whatever
# the backend: dynamic int8 moved the shipped model's pile from 0.9971 (fp32) to 0.9967 (0.13 logits) on an AVX2 CPU.
UNSURE_FAST_SHARE = 0.15
MARGIN_LOGITS = 0.5
MAX_SLOW_TO_FAST = 0.005  # issue #3: at most 0.5% of slow-path queries on the fast path (checked, reported)
UNSURE_HELP = "Quantile of the model's fast-answer confidences on validation that the threshold starts from."


def rates(p_slow: np.ndarray, labels: np.ndarray, threshold: float | np.ndarray) -> dict[str, float]:
    """Where routing at `threshold` (one, or one per query) sends these queries: `router.routing.route`'s rule."""
    fast = (p_slow < 0.5) & (1 - p_slow >= threshold)
    return evaluate.routing_rates(np.where(fast, data.FAST, data.SLOW), labels)


def choose(
    p_slow: np.ndarray,
    labels: np.ndarray,
    unsure_fast_share: float = UNSURE_FAST_SHARE,
    max_slow_to_fast: float = MAX_SLOW_TO_FAST,
    margin_logits: float = MARGIN_LOGITS,
) -> dict[str, Any]:
    """The `unsure_fast_share` quantile of the model's fast-answer confidences, lowered by `margin_logits`.

    A quantile of the model's own confidences, not a fixed value or a count of errors: a model's fast answers pile
    up just under its own confidence ceiling (median 0.9877, at most 0.9887, for one 4-layer model; 0.999 for
    another), so a fixed 0.99 sends all of one model's fast path slow; and the lowest threshold that keeps
    validation's slow→fast rate within 0.5% (1-2 errors on a validation split) picked 0.6 to 0.999 for five models
    of one recipe, which sent 16% of queries fast out of fold instead of 31%. The quantile moves with each model's
    ceiling, and the margin keeps the threshold out of the pile, where a backend's rounding would move the whole
    pile across it; `target_met` says whether validation's slow→fast rate is within `max_slow_to_fast` at it.
    """
    fast_confidence = 1 - p_slow[p_slow < 0.5]
    quantile = float(np.quantile(fast_confidence, unsure_fast_share)) if fast_confidence.size else 0.5
    quantile = min(max(quantile, 0.5), 1 - 1e-9)
    lowered = 1 / (1 + math.exp(margin_logits - math.log(quantile / (1 - quantile))))
    # Rounded down to 4 decimals: a readable routing.json that never sends one more answer slow than chosen.
    value = max(0.5, math.floor(lowered * 1e4) / 1e4)
    measured = rates(p_slow, labels, value)
    return {
        "confidence_threshold": value,
        "unsure_fast_share": unsure_fast_share,
        "margin_logits": margin_logits,
        "max_slow_to_fast": max_slow_to_fast,
        "target_met": measured["slow_to_fast_rate"] <= max_slow_to_fast,
        "chosen_on": {
            "records": len(labels),
            "slow_path_records": int((labels == data.SLOW).sum()),
        }
        | measured,
    }


def choose_for_model(
    model_dir: Path, validation: list[data.Example], unsure_fast_share: float, settings: Settings
) -> dict[str, Any]:
    """Predict the validation split with the model as the service loads it (in fp32, which answers alike on every
    CPU; the margin covers the int8 backends' shift), choose, and write routing.json."""
    fp32 = settings.model_copy(update={"model_backend": "torch"})
    classifier = Classifier.load(ModelSource(path=model_dir, origin="path", name=str(model_dir)), fp32)
    predictions = evaluate.predict(classifier, [e.text for e in validation], batch_size=32)
    p_slow = evaluate.slow_probability(predictions, settings.slow_label)
    choice = choose(p_slow, np.array([e.label for e in validation]), unsure_fast_share)
    choice["chosen_on"] |= {"split": "validation", "backend": fp32.model_backend}
    (model_dir / ROUTING_FILE).write_text(json.dumps(choice, indent=2) + "\n")
    if not choice["target_met"]:
        log.warning(
            "at threshold %.4f, %.2f%% of validation's slow-path queries go fast (target %.2f%%)",
            choice["confidence_threshold"],
            100 * choice["chosen_on"]["slow_to_fast_rate"],
            100 * choice["max_slow_to_fast"],
        )
    return choice


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path, help="Model folder; routing.json is written into it.")
    parser.add_argument("--data", help="Local dolly JSONL file; default: the Hub dataset " + data.HUB_DATASET)
    parser.add_argument("--seed", type=int, help="Split seed; default: the one in the model's training_report.json.")
    parser.add_argument("--unsure-fast-share", type=float, default=UNSURE_FAST_SHARE, help=UNSURE_HELP)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    seed = args.seed if args.seed is not None else evaluate.training_seed(evaluate.training_report(args.model))
    in_scope, _ = data.to_examples(data.load_records(args.data))
    validation = data.split(in_scope, seed=seed).validation
    choice = choose_for_model(args.model, validation, args.unsure_fast_share, Settings())
    log.info(
        "threshold %.4f: on validation %.1f%% fast, slow→fast %.2f%%",
        choice["confidence_threshold"],
        100 * choice["chosen_on"]["fast_share"],
        100 * choice["chosen_on"]["slow_to_fast_rate"],
    )


if __name__ == "__main__":
    main()
