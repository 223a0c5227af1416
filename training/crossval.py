"""Cross-validate the training recipe: `python -m training.crossval --output-dir reports/crossval --data PATH`.

One 332-query test split moves 0.3 points per query, so two recipes (or a recipe and a target) cannot be told apart
on it. Here every record of the train and validation splits is predicted once by a model that never saw it
(stratified k-fold, each fold trained exactly like `training.train`: same options, early stopping on its own
validation part). That gives an accuracy over ten times as many records, the full list of disagreements to audit
against the label rule, a threshold sweep, and a measure of how `training.threshold`'s per-model choice does on data
it did not choose on (each fold's model routes its test part at the threshold chosen on its own validation part).
The test split is left out, so it stays the final check of whatever this selects. `--distill-layers N` cross-validates
distillation: each fold first trains a teacher on its own train part, so no answer the student learns from has
seen the fold's test records (a fixed `--distill-from` teacher would have). Nothing is saved but
`crossval_report.json` and `crossval_predictions.json`; the shipped model still comes from `training.train`.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoTokenizer

from router.config import Settings
from router.model import backbone_path
from router.routing import pick_threshold
from training import data, distill, evaluate, threshold, train
from training.pushgateway import PushgatewayCallback, TrainingMetrics

log = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = train.build_parser(__doc__)
    parser.add_argument("--folds", type=int, default=5, help="Number of folds (each record is tested once).")
    parser.add_argument(
        "--threshold", type=float, help="One fixed threshold for the sweep's routed report; default: the service's."
    )
    parser.add_argument(
        "--distill-layers",
        type=int,
        help="Cross-validate distillation: each fold trains a teacher (the recipe as given, all its layers), then a "
        "student of this many layers distilled from it; the report is the student's.",
    )
    args = parser.parse_args(argv)
    if args.distill_from:
        # A teacher trained on the fixed split has seen every fold's held-out records: its answers would leak them.
        parser.error("--distill-from: the teacher has seen the records each fold holds out; use --distill-layers")
    return args


def predict_slow(model: Any, tokenizer: Any, texts: list[str], max_length: int) -> np.ndarray:
    """P(slow) per text, in the texts' order."""
    return torch.softmax(distill.logits(model, tokenizer, texts, max_length), dim=-1)[:, data.SLOW].cpu().numpy()


def shipped_thresholds(
    p_slow: np.ndarray, labels: np.ndarray, thresholds: np.ndarray, chosen: list[float], unsure_fast_share: float
) -> dict[str, Any]:
    """How `training.threshold`'s procedure does on data it did not choose on: each fold's model routes its test
    part at the threshold chosen on its own validation part, as a shipped model would."""
    chose = {
        "unsure_fast_share": unsure_fast_share,
        "margin_logits": threshold.MARGIN_LOGITS,
        "fold_thresholds": chosen,
    }
    return chose | threshold.rates(p_slow, labels, thresholds)


def fit_fold(args: argparse.Namespace, tokenizer: Any, splits: data.Splits, work: Path, callbacks: list[Any]) -> Any:
    """The fold's model: the recipe trained on the fold's train part, or with `--distill-layers` a student taught by
    a teacher trained on that same part, so no answer it learns from has seen the fold's test records."""
    if not args.distill_layers:
        return train.fit(args, tokenizer, splits.train, splits.validation, str(work / "checkpoints"), callbacks)
    teacher_args = argparse.Namespace(**vars(args) | {"distill_layers": None})
    teacher = train.fit(teacher_args, tokenizer, splits.train, splits.validation, str(work / "teacher-checkpoints"), [])
    train.save(teacher.model, tokenizer, teacher_args, work / "teacher")
    student_args = argparse.Namespace(
        **vars(args) | {"num_layers": args.distill_layers, "distill_from": work / "teacher"}
    )
    return train.fit(student_args, tokenizer, splits.train, splits.validation, str(work / "checkpoints"), callbacks)


def crossval(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    settings = Settings()
    fixed = pick_threshold(settings.confidence_threshold, None).value if args.threshold is None else args.threshold
    records = data.load_records(args.data)
    in_scope, _ = data.to_examples(records)
    held_out = data.split(in_scope, seed=args.seed)
    examples = held_out.train + held_out.validation  # the test split stays unseen: it is the final check
    tokenizer = AutoTokenizer.from_pretrained(backbone_path(args.base_model))

    run_id = args.run_id or uuid.uuid4().hex[:12]
    p_slow = np.zeros(len(examples))
    fold_accuracy = []
    fold_predictions = []  # each fold's validation and test P(slow): what a threshold procedure is measured on
    fold_thresholds = []
    record_thresholds = np.zeros(len(examples))  # the threshold each record's own fold model would ship with
    for fold, (test_indices, splits) in enumerate(data.folds(examples, args.folds, args.seed)):
        url = args.pushgateway_url  # each fold is a run of its own on the training dashboard
        callbacks = [PushgatewayCallback(TrainingMetrics(url, f"{run_id}-fold{fold + 1}"))] if url else []
        with tempfile.TemporaryDirectory(prefix="router-crossval-") as work:
            trainer = fit_fold(args, tokenizer, splits, Path(work), callbacks)
        p_slow[test_indices] = predict_slow(trainer.model, tokenizer, [e.text for e in splits.test], args.max_length)
        p_validation = predict_slow(trainer.model, tokenizer, [e.text for e in splits.validation], args.max_length)
        y_validation = np.array([e.label for e in splits.validation])
        choice = threshold.choose(p_validation, y_validation, args.unsure_fast_share)
        fold_thresholds.append(choice["confidence_threshold"])
        record_thresholds[test_indices] = fold_thresholds[-1]
        fold_predictions.append(
            {
                "validation": {"p_slow": p_validation.round(6).tolist(), "labels": y_validation.tolist()},
                "test": {"indices": test_indices, "p_slow": p_slow[test_indices].round(6).tolist()},
            }
        )
        fold_accuracy.append(float(np.mean((p_slow[test_indices] >= 0.5) == [e.label for e in splits.test])))
        log.info("fold %d/%d: test accuracy %.4f", fold + 1, args.folds, fold_accuracy[-1])

    labels = np.array([e.label for e in examples])
    metrics, _ = evaluate.assess(p_slow, labels, settings, fixed)
    predicted = (p_slow >= 0.5).astype(int)
    counts = Counter(e.category for e in examples)
    right = Counter(e.category for e, ok in zip(examples, predicted == labels, strict=True) if ok)
    disagreements = [
        {"category": e.category, "label": e.label, "p_slow": round(float(p), 4), "text": e.text[:300]}
        for e, p, wrong in zip(examples, p_slow, predicted != labels, strict=True)
        if wrong
    ]
    report = {
        "run_id": run_id,
        "folds": args.folds,
        "base_model": args.base_model,
        "method": args.method,
        "hyperparameters": train.hyperparameters(args),
        "data": {
            "sha256": data.data_hash(records),
            "records": len(records),
            "in_scope": len(in_scope),
            "crossvalidated": len(examples),
            "test_split_left_out": len(held_out.test),
        },
        "fold_accuracy": fold_accuracy,
        "per_category_accuracy": {c: right[c] / n for c, n in sorted(counts.items())},
        **metrics,
        "per_model_threshold": shipped_thresholds(
            p_slow, labels, record_thresholds, fold_thresholds, args.unsure_fast_share
        ),
        "disagreements": sorted(disagreements, key=lambda d: (d["category"], d["p_slow"])),
        "wall_time_seconds": round(time.perf_counter() - started, 1),
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "crossval_report.json").write_text(json.dumps(report, indent=2) + "\n")
    predictions = {"labels": labels.tolist(), "p_slow": p_slow.round(6).tolist(), "folds": fold_predictions}
    (args.output_dir / "crossval_predictions.json").write_text(json.dumps(predictions) + "\n")
    return report


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    report = crossval(parse_args(argv))
    log.info(
        "%d-fold out-of-fold accuracy %.4f over %d records (folds %s); routed at %.2f: slow→fast %.4f",
        report["folds"],
        report["model"]["accuracy"],
        report["data"]["crossvalidated"],
        ", ".join(f"{a:.4f}" for a in report["fold_accuracy"]),
        report["routed"]["threshold"],
        report["routed"]["slow_to_fast_rate"],
    )


if __name__ == "__main__":
    main()
