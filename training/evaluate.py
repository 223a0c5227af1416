"""Measure a router model on the held-out test split: `python -m training.evaluate --model DIR --data PATH`.

The model is loaded exactly as the service loads it (`router.model` + `router.inference.Classifier`, adapter merge
included) and routed with `router.routing.route`, so what is measured is what is served. The split is rebuilt from
the seed in the model's training_report.json; the test part was never seen in training or model selection. The
optional temperature is fitted on the validation part only.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from router.config import Settings
from router.inference import Classifier
from router.model import ModelSource, shipped_threshold
from router.routing import Prediction, pick_threshold, route
from training import data

log = logging.getLogger(__name__)

SWEEP = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999)
_EPS = 1e-7


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path, help="Model folder (full model or adapter folder).")
    parser.add_argument("--data", help="Local dolly JSONL file; default: the Hub dataset " + data.HUB_DATASET)
    parser.add_argument("--seed", type=int, help="Split seed; default: the one in the model's training_report.json.")
    parser.add_argument(
        "--threshold",
        type=float,
        help="Routing threshold; default: CONFIDENCE_THRESHOLD, else the model's routing.json.",
    )
    parser.add_argument("--temperature-scaling", action="store_true", help="Also fit a temperature on validation.")
    parser.add_argument("--output", type=Path, help="JSON report path (default: MODEL/evaluation.json).")
    parser.add_argument("--plots-dir", type=Path, help="Folder for the PNG plots (default: next to the report).")
    parser.add_argument("--batch-size", type=int, default=32)
    return parser.parse_args(argv)


def predict(classifier: Classifier, texts: list[str], batch_size: int) -> list[Prediction]:
    predictions: list[Prediction] = []
    for start in range(0, len(texts), batch_size):
        predictions.extend(classifier.predict(texts[start : start + batch_size]))
    return predictions


def slow_probability(predictions: list[Prediction], slow_label: str) -> np.ndarray:
    """P(slow) per text, recovered from the top label and its probability (two classes)."""
    return np.array([p.confidence if p.label == slow_label else 1 - p.confidence for p in predictions])


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, Any]:
    """Accuracy, per-label precision/recall/F1 and the confusion matrix (rows: true, columns: predicted)."""
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=[0, 1], zero_division=0)
    per_label = {
        data.ID2LABEL[i]: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i in (0, 1)
    }
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "per_label": per_label,
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=[0, 1]).tolist(),
    }


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = 10) -> float:
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by bin size."""
    edges = np.linspace(0.5, 1.0, bins + 1)  # a binary top-label confidence is never below 0.5
    index = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    error = 0.0
    for b in range(bins):
        mask = index == b
        if mask.any():
            error += mask.mean() * abs(correct[mask].mean() - confidence[mask].mean())
    return float(error)


def top_label(p_slow: np.ndarray, settings: Settings) -> list[Prediction]:
    return [
        Prediction(settings.slow_label, float(p)) if p >= 0.5 else Prediction(settings.fast_label, float(1 - p))
        for p in p_slow
    ]


def apply_temperature(p_slow: np.ndarray, temperature: float) -> np.ndarray:
    """Divide the logit margin by the temperature: same decisions, rescaled confidence."""
    margin = np.log(np.clip(p_slow, _EPS, 1 - _EPS) / np.clip(1 - p_slow, _EPS, 1 - _EPS))
    return 1 / (1 + np.exp(-margin / temperature))


def fit_temperature(p_slow: np.ndarray, y_true: np.ndarray) -> float:
    """Temperature minimising validation negative log-likelihood (a 1-D grid search is exact enough)."""
    grid = np.exp(np.linspace(math.log(0.05), math.log(20), 400))

    def nll(t: float) -> float:
        p = np.clip(apply_temperature(p_slow, t), _EPS, 1 - _EPS)
        return float(-np.mean(y_true * np.log(p) + (1 - y_true) * np.log(1 - p)))

    return float(min(grid, key=nll))


def routing_rates(y_routed: np.ndarray, y_true: np.ndarray) -> dict[str, float]:
    """Share of all queries routed fast, and the two ways routing can be wrong, from routed and true labels."""
    slow = y_true == data.SLOW
    return {
        "fast_share": float((y_routed == data.FAST).mean()),
        "slow_to_fast_rate": float((y_routed[slow] == data.FAST).mean()) if slow.any() else 0.0,
        "fast_to_slow_rate": float((y_routed[~slow] == data.SLOW).mean()) if (~slow).any() else 0.0,
    }


def assess(
    p_slow: np.ndarray, y_true: np.ndarray, settings: Settings, threshold: float
) -> tuple[dict[str, Any], list[Prediction]]:
    """Model metrics, the same after routing at `threshold`, ECE and the threshold sweep."""
    predictions = top_label(p_slow, settings)
    y_model = np.array([data.LABEL2ID[p.label] for p in predictions])
    confidence = np.array([p.confidence for p in predictions])

    def routed(t: float) -> np.ndarray:
        return np.array([data.LABEL2ID[route(p, t, settings.fast_label, settings.slow_label)] for p in predictions])

    y_routed = routed(threshold)
    sweep = []
    for t in SWEEP:
        y_t = routed(t)
        sweep.append({"threshold": t} | routing_rates(y_t, y_true) | {"accuracy": float((y_t == y_true).mean())})
    at_threshold = routing_rates(y_routed, y_true)
    report = {
        "model": classification_metrics(y_true, y_model),
        "routed": classification_metrics(y_true, y_routed)
        | {
            "threshold": threshold,
            "fast_share": at_threshold["fast_share"],
            "slow_to_fast_rate": at_threshold["slow_to_fast_rate"],
        },
        "ece": expected_calibration_error(confidence, (y_model == y_true).astype(float)),
        "threshold_sweep": sweep,
    }
    return report, predictions


def out_of_scope_report(
    classifier: Classifier, examples: list[data.Example], settings: Settings, threshold: float, batch_size: int
) -> dict[str, dict[str, Any]]:
    """Where the categories outside the two classes end up after routing (no right answer, just the behaviour)."""
    predictions = predict(classifier, [e.text for e in examples], batch_size)
    report: dict[str, dict[str, Any]] = {}
    for category in sorted({e.category for e in examples}):
        routed = [
            route(p, threshold, settings.fast_label, settings.slow_label)
            for e, p in zip(examples, predictions, strict=True)
            if e.category == category
        ]
        report[category] = {
            "count": len(routed),
            "routed_fast_share": sum(label == settings.fast_label for label in routed) / len(routed),
        }
    return report


def plot(report: dict[str, Any], p_slow: np.ndarray, y_true: np.ndarray, folder: Path) -> list[Path]:
    """Confusion matrix, confidence histogram and threshold curve as small PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    paths = []

    fig, ax = plt.subplots(figsize=(3.6, 3.2), dpi=100)
    matrix = np.array(report["model"]["confusion_matrix"])
    ax.imshow(matrix, cmap="Blues")
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(value), ha="center", va="center", color="white" if value > matrix.max() / 2 else "black")
    ax.set_xticks([0, 1], ["0 fast", "1 slow"])
    ax.set_yticks([0, 1], ["0 fast", "1 slow"])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Test confusion matrix")
    paths.append(_save(fig, folder / "confusion_matrix.png"))

    fig, ax = plt.subplots(figsize=(4.8, 3.2), dpi=100)
    confidence = np.maximum(p_slow, 1 - p_slow)
    correct = (p_slow >= 0.5).astype(int) == y_true
    bins = np.linspace(0.5, 1.0, 26).tolist()
    ax.hist([confidence[correct], confidence[~correct]], bins=bins, stacked=True, label=["correct", "wrong"])
    ax.set_yscale("log")
    ax.set_xlabel("top-label confidence")
    ax.set_ylabel("test queries")
    ax.set_title("Confidence histogram")
    ax.legend()
    paths.append(_save(fig, folder / "confidence_histogram.png"))

    fig, ax = plt.subplots(figsize=(4.8, 3.2), dpi=100)
    sweep = report["threshold_sweep"]
    thresholds = [row["threshold"] for row in sweep]
    ax.plot(thresholds, [row["fast_share"] for row in sweep], marker="o", label="share routed fast")
    ax.plot(thresholds, [row["slow_to_fast_rate"] for row in sweep], marker="o", label="slow queries sent fast")
    ax.axvline(report["routed"]["threshold"], color="gray", linestyle="--", label="configured threshold")
    ax.set_xlabel("confidence threshold")
    ax.set_ylabel("share")
    ax.set_title("Threshold sweep (test)")
    ax.legend(fontsize=8)
    paths.append(_save(fig, folder / "threshold_curve.png"))
    return paths


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def training_report(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "training_report.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def training_seed(report: dict[str, Any]) -> int:
    """The split seed the model was trained with (from its training report), so its splits are rebuilt exactly."""
    return int(report.get("data", {}).get("split_seed", 42))


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    settings = Settings()
    chosen = pick_threshold(settings.confidence_threshold, shipped_threshold(args.model))
    threshold = chosen.value if args.threshold is None else args.threshold
    trained = training_report(args.model)
    seed = args.seed if args.seed is not None else training_seed(trained)

    records = data.load_records(args.data)
    in_scope, out_of_scope = data.to_examples(records)
    splits = data.split(in_scope, seed=seed)
    if trained.get("data", {}).get("sha256") not in (None, data.data_hash(records)):
        log.warning("evaluation data differs from the model's training data: the test split may overlap training")

    classifier = Classifier.load(ModelSource(path=args.model, origin="path", name=str(args.model)), settings)
    y_test = np.array([e.label for e in splits.test])
    p_test = slow_probability(predict(classifier, [e.text for e in splits.test], args.batch_size), settings.slow_label)

    report, _ = assess(p_test, y_test, settings, threshold)
    report = {
        "model_dir": str(args.model),
        "run_id": trained.get("run_id"),
        "data_sha256": data.data_hash(records),
        "split_seed": seed,
        "split_sizes": splits.sizes(),
        "max_length": settings.max_length,
        "threshold_source": "argument" if args.threshold is not None else chosen.source,
    } | report
    if args.temperature_scaling:
        y_val = np.array([e.label for e in splits.validation])
        texts = [e.text for e in splits.validation]
        p_val = slow_probability(predict(classifier, texts, args.batch_size), settings.slow_label)
        temperature = fit_temperature(p_val, y_val)
        scaled, _ = assess(apply_temperature(p_test, temperature), y_test, settings, threshold)
        report["temperature_scaled"] = {"temperature": temperature} | scaled
    if out_of_scope:
        report["out_of_scope"] = out_of_scope_report(classifier, out_of_scope, settings, threshold, args.batch_size)

    output = args.output or args.model / "evaluation.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    plots = plot(report, p_test, y_test, args.plots_dir or output.parent)
    report["plots"] = [str(path) for path in plots]
    output.write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    report = evaluate(args)
    model, routed = report["model"], report["routed"]
    log.info(
        "test accuracy %.4f, slow F1 %.4f; routed at %.4g: accuracy %.4f, slow→fast %.4f, fast share %.3f; ECE %.4f",
        model["accuracy"],
        model["per_label"]["1"]["f1"],
        routed["threshold"],
        routed["accuracy"],
        routed["slow_to_fast_rate"],
        routed["fast_share"],
        report["ece"],
    )


if __name__ == "__main__":
    main()
